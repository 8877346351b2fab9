"""SSM layers: (B, L, H) -> (B, L, H) modules that own parameters and call `diagssm.ops`."""
from diagssm.layers.dss import DSS
from diagssm.layers.s4 import S4
from diagssm.layers.s4d import S4D
from diagssm.layers.s5 import S5

__all__ = ["S4D", "DSS", "S5", "S4"]
