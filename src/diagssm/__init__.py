"""diagssm: diagonal state space models (DSS, S4D, S5) and the S4 baseline."""
from diagssm import hippo, init, ops

__version__ = "0.1.0"
__all__ = ["hippo", "init", "ops"]
