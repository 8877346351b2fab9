"""diagssm: diagonal state space models (DSS, S4D, S5) and the S4 baseline, in PyTorch."""
from diagssm import hippo, init, ops
from diagssm.layers import DSS, S4, S4D, S5

__version__ = "0.1.0"
__all__ = ["hippo", "init", "ops", "S4D", "DSS", "S5", "S4"]
