"""SSM layers: (B, L, H) -> (B, L, H) modules that own parameters and call `diagssm.ops`."""
from diagssm.layers.dss import DSS
from diagssm.layers.s4d import S4D

__all__ = ["S4D", "DSS"]
