"""Models built from the SSM layers: the residual block, the sequence model and its heads.

    from diagssm.models import make_layer, ResidualBlock, SequenceModel, LAYER_NAMES
"""
from diagssm.models.block import LAYER_NAMES, ResidualBlock, TiedDropout, make_layer
from diagssm.models.heads import RetrievalHead, pool
from diagssm.models.sequence import SequenceModel

__all__ = ["LAYER_NAMES", "make_layer", "ResidualBlock", "SequenceModel", "TiedDropout", "RetrievalHead", "pool"]
