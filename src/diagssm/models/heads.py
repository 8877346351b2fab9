"""Pooling over the sequence and the output heads of `SequenceModel`.

Mean pooling is the S4 repository's classifier pooling (state-spaces/s4, `example.py`:
`x.mean(dim=1)`), here restricted to each sequence's real steps. The retrieval head is the
two-tower ("dual encoder") classifier of the Long Range Arena retrieval task (Tay et al.,
"Long Range Arena: A Benchmark for Efficient Transformers", ICLR 2021, Sec. 2.2.3 and the LRA
code's matching model), in the form the S4 repository's retrieval decoder uses:

    logits = W2 GELU(W1 [o1, o2, o1 - o2, o1 * o2] + b1) + b2,   W1: 4H -> H, W2: H -> d_output

The order of the features matters: swapping the two documents changes the logits.
"""
import torch
from torch import nn

from diagssm.models.block import check_choice, check_lengths, step_mask

POOLINGS = ("mean", "last", "none")
HEADS = ("classification", "regression", "per_step", "retrieval")


def pool(h, lengths, pooling):
    """Pool the model's features over the steps of each sequence.

        "mean": (1/lengths[b]) sum_{t < lengths[b]} h[b, t]   (all L steps when lengths is None)
        "last": h[b, lengths[b] - 1]                            (h[b, L-1] when lengths is None)
        "none": h unchanged

    Shapes: h (B, L, H); lengths (B,) int or None -> (B, H), or (B, L, H) for "none"
    An unknown `pooling`, or lengths outside [1, L], is a ValueError (an unknown name had pooled as
    "last" or "mean", lengths past L had divided by them, 0 had given NaN or step -1).
    """
    check_choice("pooling", pooling, POOLINGS)
    if not torch.is_tensor(h) or h.dim() != 3:
        raise ValueError(f"h must be (B, L, H); got {tuple(h.shape) if torch.is_tensor(h) else type(h).__name__}")
    check_lengths(lengths, h.shape[0], h.shape[1])
    return pooled(h, lengths, pooling)


def pooled(h, lengths, pooling):
    """`pool` without its checks, for callers that made them (`SequenceModel`: the pooling at
    construction, the lengths in `encode`; checking again costs a device sync per forward)."""
    if pooling == "none":
        return h
    Bsz, L, _ = h.shape
    if lengths is None:
        return h.mean(1) if pooling == "mean" else h[:, -1]  # (B, H)
    if pooling == "last":
        return h[torch.arange(Bsz, device=h.device), lengths - 1]  # (B, H)
    real = step_mask(lengths, L)[..., None]  # (B, L, 1)
    return h.masked_fill(~real, 0.0).sum(1) / lengths[:, None].to(h.dtype)  # (B, H)


class RetrievalHead(nn.Module):
    """The LRA retrieval classifier on two pooled encodings (module docstring).

    Shapes: o1, o2 (B, H) -> logits (B, d_output)
    """

    def __init__(self, d_model, d_output):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * d_model, d_model), nn.GELU(), nn.Linear(d_model, d_output))

    def forward(self, o1, o2):
        features = torch.cat([o1, o2, o1 - o2, o1 * o2], dim=-1)  # (B, 4H)
        return self.mlp(features)  # (B, d_output)
