"""A deep SSM sequence model: encoder -> residual blocks -> (final norm) -> pooling -> head.

The backbone is the S4 repository's (state-spaces/s4: `example.py`'s S4Model, and the final
norm after a pre-norm stack of its `SequenceModel` backbone); the gated outputs come from the
S5 code (`models/block.py`); the retrieval head from the LRA benchmark (Tay et al. 2021,
`models/heads.py`).

    h_0 = encoder(x)                        nn.Embedding (tokens) | nn.Linear (features)
    h_i = block_i(h_(i-1)),  i = 1..n_layers   (padded steps zeroed before each block)
    h   = norm(h_n) if prenorm else h_n
    out = head(pool(h))
"""
import math

import torch
from torch import nn

from diagssm.layers.base import check_bools, check_length, check_positive_ints
from diagssm.models.block import (ResidualBlock, check_choice, check_lengths, check_rate,
                                  make_norm, norm_sequence, norm_step, step_mask)
from diagssm.models.heads import HEADS, POOLINGS, RetrievalHead, pooled

ENCODERS = ("embedding", "linear")


class SequenceModel(nn.Module):
    """Encoder, n_layers `ResidualBlock`s, pooling and a head.

    Args:
        d_input: vocabulary size ("embedding") or input features ("linear").
        d_output: classes, regression targets or output vocabulary.
        d_model, n_layers, layer, layer_kwargs, norm, prenorm, activation, dropout: the blocks'
            (`ResidualBlock`); a pre-norm stack ends with one more norm of the same kind.
        encoder: "embedding" (x (B, L) integer tokens) | "linear" (x (B, L, d_input) float).
        pooling: "mean" (over the first lengths[b] steps) | "last" (step lengths[b] - 1) |
            "none" (per step).
        head: "classification" | "regression" (Linear H -> d_output on the pooled features, or
            per step when pooling="none") | "per_step" (the same per step; needs pooling="none":
            language modelling, seq2seq) | "retrieval" (`RetrievalHead` on two pooled
            encodings, via `forward_pair`; needs pooling != "none").

        L: the length a length-dependent layer's system is defined for (DSS-softmax normalises its
            kernel over L; the other layers ignore it), an int >= 1 or None (each call's length).
            Training runs on a task of variable lengths give its longest sequence (`Task.max_length`),
            as the reference code's inputs padded to a fixed length do.

    Variable lengths: the padded steps (t >= lengths[b]) are zeroed before every block, so they
    reach neither the real steps' outputs (also through a bidirectional layer) nor the pooling.
    A length-dependent layer's system depends on L, so such a model needs `L` for padded batches
    (an error without it): otherwise a sequence's outputs would depend on how long its batch is
    padded. At `rate` r the model's L counts ceil(L / r) steps (`system_length`).

    BatchNorm (norm="batch") in train mode normalises with statistics over all B and L steps, later
    ones included: a per-step model (pooling="none") trained so sees the future through them, which
    eval mode and `step` do not. Use norm="layer" where that matters (causal generation).

    Recurrent inference (`default_state`, `step`; pooling="none" only) runs every block's `step`
    with eval-mode semantics (no dropout, BatchNorm on running statistics: `ResidualBlock`); in
    eval mode stepping over a sequence equals `forward`. A DSS-softmax model is stepped with
    `L=` the length of the sequence (its system depends on it; default the model's `L`); other
    layers ignore L.

    Sampling rate: `rate` (forward, forward_pair, step) multiplies every SSM layer's dt, so a model
    trained on a signal reads the same signal sampled at 1/rate of that rate (S5 paper, Sec. 6.3;
    S4D: the same dt scaling). Every layer gets the same rate.

    Shapes:
        forward: x (B, L) int or (B, L, d_input); lengths (B,) int or None
            -> (B, d_output), or (B, L, d_output) with pooling="none"
        forward_pair: x1, x2 as x (lengths may differ) -> (B, d_output)
        step: x_t (B,) int or (B, d_input); state: list of n_layers layer states -> (B, d_output), state
    """

    def __init__(self, d_input, d_output, d_model=64, n_layers=4, layer="s4d", layer_kwargs=None,
                 encoder="linear", norm="layer", prenorm=True, activation="gelu", dropout=0.0,
                 pooling="mean", head="classification", L=None):
        super().__init__()
        check_positive_ints("SequenceModel", d_input=d_input, d_output=d_output, d_model=d_model, n_layers=n_layers)
        check_length(L)
        self.L = L
        check_choice("encoder", encoder, ENCODERS)
        check_choice("pooling", pooling, POOLINGS)
        check_choice("head", head, HEADS)
        if head == "per_step" and pooling != "none":
            raise ValueError(f"head='per_step' needs pooling='none'; got pooling={pooling!r}")
        if head == "retrieval" and pooling == "none":
            raise ValueError(f"head='retrieval' needs a pooled encoding; got pooling='none'; "
                             f"allowed: {tuple(p for p in POOLINGS if p != 'none')}")
        self.d_input, self.d_output, self.d_model = d_input, d_output, d_model
        (prenorm,) = check_bools("SequenceModel", prenorm=prenorm)
        self.encoder_name, self.pooling, self.head_name, self.prenorm = encoder, pooling, head, prenorm
        self.encoder = nn.Embedding(d_input, d_model) if encoder == "embedding" else nn.Linear(d_input, d_model)
        self.blocks = nn.ModuleList([ResidualBlock(d_model, layer, layer_kwargs, norm, prenorm, activation, dropout)
                                     for _ in range(n_layers)])
        self.norm = make_norm(norm, d_model) if prenorm else None
        self.head = RetrievalHead(d_model, d_output) if head == "retrieval" else nn.Linear(d_model, d_output)

    def check_input(self, x, name="x", step=False):
        """Fail early on a wrong shape or dtype (the encoder's errors would not name the argument)."""
        got = (tuple(x.shape), x.dtype) if torch.is_tensor(x) else type(x).__name__
        if self.encoder_name == "embedding":
            want = "(B,)" if step else "(B, L)"
            if not (torch.is_tensor(x) and x.dim() == 2 - step and x.dtype in (torch.int64, torch.int32)):
                raise ValueError(f"{name} must be an int64 (or int32) tensor of tokens {want} "
                                 f"for encoder='embedding'; got {got}")
            if x.numel() and (x.min() < 0 or x.max() >= self.d_input):
                raise ValueError(f"{name} has tokens in [{x.min().item()}, {x.max().item()}]; "
                                 f"allowed: 0 <= token < d_input = {self.d_input}")
        else:
            want, dtype = "(B, d_input)" if step else "(B, L, d_input)", self.encoder.weight.dtype
            if not (torch.is_tensor(x) and x.dim() == 3 - step and x.shape[-1] == self.d_input and x.dtype == dtype):
                raise ValueError(f"{name} must be a {dtype} tensor {want} with d_input = {self.d_input} "
                                 f"for encoder='linear'; got {got}")
        if not step and x.shape[1] < 1:
            raise ValueError(f"{name} has length L = 0; need L >= 1")

    def encode(self, x, lengths=None, name="x", rate=1.0, L=None):
        """The features before pooling. Shapes: x as in forward -> h (B, L, H)"""
        self.check_input(x, name)
        check_lengths(lengths, x.shape[0], x.shape[1])
        check_rate(rate)
        L = self.system_length(L, rate, x.shape[1])
        if L is None and self.length_dependent and lengths is not None and bool((lengths < x.shape[1]).any()):
            raise ValueError("this model's DSS-softmax layers normalise over the sequence length L: with padded "
                             "sequences (lengths below the batch's length) give SequenceModel(L=...), the longest "
                             "sequence it reads, so that a sequence's outputs do not depend on how its batch is padded")
        h = self.encoder(x)  # (B, L, H)
        for block in self.blocks:
            h = block(h, lengths, rate, L)  # (B, L, H); each block zeroes its input's padded steps
        if self.norm is None:
            return h
        mask = None if lengths is None else step_mask(lengths, x.shape[1])  # (B, L)
        return norm_sequence(self.norm, h, mask)  # (B, L, H)

    def forward(self, x, lengths=None, rate=1.0, L=None):
        """out = head(pool(encode(x))); `rate` multiplies every layer's dt; `L` (default the model's) is the
        length a DSS-softmax layer's system is defined for. Shapes: the class docstring."""
        if self.head_name == "retrieval":
            raise ValueError("head='retrieval' scores a pair of sequences: "
                             "call forward_pair(x1, x2, lengths1, lengths2)")
        h = self.encode(x, lengths, rate=rate, L=L)  # (B, L, H)
        return self.head(pooled(h, lengths, self.pooling))  # (B, d_output) or (B, L, d_output)

    def forward_pair(self, x1, x2, lengths1=None, lengths2=None, rate=1.0):
        """LRA retrieval: both sequences through the same encoder and blocks, pooled, then the
        retrieval head on [o1, o2, o1 - o2, o1 * o2]. Shapes: x1, x2 as x -> (B, d_output)"""
        if self.head_name != "retrieval":
            raise ValueError(f"forward_pair needs head='retrieval'; this model has head={self.head_name!r}")
        o1 = pooled(self.encode(x1, lengths1, "x1", rate), lengths1, self.pooling)  # (B, H)
        o2 = pooled(self.encode(x2, lengths2, "x2", rate), lengths2, self.pooling)  # (B, H)
        if o1.shape[0] != o2.shape[0]:
            raise ValueError(f"x1 and x2 must have the same batch size; got {o1.shape[0]} and {o2.shape[0]}")
        return self.head(o1, o2)  # (B, d_output)

    @property
    def length_dependent(self):
        """Whether a layer's system depends on the sequence length (DSS-softmax)."""
        return any(block.length_dependent for block in self.blocks)

    def system_length(self, L, rate=1.0, length=1):
        """The `L` a length-dependent layer gets: the one given, else the model's `L` in steps of the
        input's rate (ceil(L / rate): a signal resampled to 1/rate of the training rate spans as long a
        time in L / rate steps; at least the input's `length`, for an input not resampled), else None
        (each call's length)."""
        if L is not None or self.L is None:
            return L
        return max(length, math.ceil(self.L / rate))

    def default_state(self, batch_size):
        """One zero layer state per block (a list of n_layers tensors)."""
        return [block.default_state(batch_size) for block in self.blocks]

    def step(self, x_t, state, rate=1.0, L=None):
        """One step of recurrent inference through the whole model (pooling="none" only).
        `rate` as in forward; `L`: the length of the sequence being stepped, needed by DSS-softmax
        layers (their system depends on it; default the model's `L`) and unused by the others.

        Shapes: x_t (B,) int or (B, d_input); state: list of n_layers layer states
            -> out_t (B, d_output), the new list of states
        """
        if self.pooling != "none":
            raise ValueError(f"step needs pooling='none' (one output per step); "
                             f"this model has pooling={self.pooling!r}")
        self.check_input(x_t, "x_t", step=True)
        if not isinstance(state, (list, tuple)) or len(state) != len(self.blocks):
            is_list = isinstance(state, (list, tuple))
            got = f"{type(state).__name__} of length {len(state)}" if is_list else type(state).__name__
            raise ValueError(f"state must be a list of {len(self.blocks)} block states (default_state); got {got}")
        h = self.encoder(x_t)  # (B, H)
        L = self.system_length(L, rate)
        new_state = []
        for block, s in zip(self.blocks, state):
            h, s = block.step(h, s, rate, L)  # (B, H)
            new_state.append(s)
        if self.norm is not None:
            h = norm_step(self.norm, h)  # (B, H)
        return self.head(h), new_state  # (B, d_output)
