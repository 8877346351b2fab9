"""The residual block around one SSM layer, and the layer factory.

The block is the S4 repository's (state-spaces/s4: `example.py`, whose S4Model wraps each
layer in norm -> layer -> dropout -> residual, and `models/s4/s4d.py`, whose layer ends with
GELU -> dropout -> output linear (+GLU)), with the gated output maps of the S5 code
(lindermanlab/S5, `s5/layers.py`, `SequenceLayer`; S5 paper, appendix on the model architecture):

    pre-norm:  x + drop(out(drop(gelu(layer(norm(x))))))
    post-norm: norm(x + drop(out(drop(gelu(layer(x))))))

with `out` chosen by `activation` (y = layer output, z = drop(gelu(y))):

    "gelu":      Linear_HH(z)                                  (S4's S4D with postact=None)
    "glu":       GLU(Linear_H,2H(z)) = a * sigmoid(b)           (S4's default; S5's "full_glu")
    "half_glu1": z * sigmoid(Linear_HH(z))                     (S5's "half_glu1")
    "half_glu2": y * sigmoid(Linear_HH(z))                     (S5's "half_glu2": GELU on the gate only)

The two half-GLU formulas and the dropout placement (after the GELU and after the output map,
both as in `SequenceLayer.__call__`) were checked against lindermanlab/S5 `s5/layers.py`. One
difference: the S5 code's plain "gelu" has no output linear; here every variant has one.
Dropout draws one mask per sequence and channel, tied over L (`TiedDropout`).
"""
import inspect
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from diagssm.layers import DSS, S4, S4D, S5
from diagssm.layers.base import check_bools, check_rate

LAYER_NAMES = ("s4d", "dss", "s5", "s4")
LAYER_CLASSES = {"s4d": S4D, "dss": DSS, "s5": S5, "s4": S4}
NORMS = ("layer", "batch")
ACTIVATIONS = ("gelu", "glu", "half_glu1", "half_glu2")


def check_choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {allowed}")


def make_layer(name, d_model, **layer_kwargs):
    """Build the SSM layer `name` ("s4d" | "dss" | "s5" | "s4") of width d_model.

    `layer_kwargs` go to the layer's constructor; S5 gets d_state=64 unless given (its
    constructor has no default). Unknown keyword names are a ValueError listing the allowed ones.

    Shapes: the layer maps (B, L, H) -> (B, L, H) (channels=1).
    """
    check_choice("layer", name, LAYER_NAMES)  # d_model: the layer's constructor checks it
    cls = LAYER_CLASSES[name]
    allowed = tuple(inspect.signature(cls).parameters)[1:]  # all but d_model
    unknown = sorted(set(layer_kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"layer_kwargs {unknown} are not arguments of {cls.__name__}; allowed: {allowed}")
    if name == "s5":
        layer_kwargs.setdefault("d_state", 64)
    return cls(d_model, **layer_kwargs)


def step_mask(lengths, L):
    """True on the real steps t < lengths[b]. lengths (B,) -> (B, L) bool."""
    return torch.arange(L, device=lengths.device) < lengths[:, None]  # (B, L)


def zero_padding(x, mask):
    """x with its padded steps set to 0 (NaN-safe). x (B, L, H), mask (B, L) or None."""
    return x if mask is None else x.masked_fill(~mask[..., None], 0.0)  # (B, L, H)


def check_lengths(lengths, B, L):
    """lengths must be None or a (B,) integer tensor with 1 <= lengths[b] <= L."""
    if lengths is None:
        return
    if not torch.is_tensor(lengths) or lengths.shape != (B,) or lengths.dtype == torch.bool \
            or lengths.is_floating_point() or lengths.is_complex():
        got = (tuple(lengths.shape), lengths.dtype) if torch.is_tensor(lengths) else type(lengths).__name__
        raise ValueError(f"lengths must be an integer tensor of shape (B,) = ({B},); got {got}")
    if (lengths < 1).any() or (lengths > L).any():
        raise ValueError(f"lengths={lengths.tolist()} out of range; allowed: 1 <= lengths[b] <= L = {L}")


def make_norm(norm, d_model):
    check_choice("norm", norm, NORMS)
    return nn.LayerNorm(d_model) if norm == "layer" else nn.BatchNorm1d(d_model)


def norm_sequence(norm, x, mask=None):
    """LayerNorm over H, or BatchNorm1d over H with statistics over B and L.

    In training mode with a mask, BatchNorm's batch statistics (and running averages) use the
    real steps only, so padding changes neither; its padded outputs are then 0.

    Shapes: x (B, L, H); mask (B, L) bool or None -> (B, L, H)
    """
    if isinstance(norm, nn.LayerNorm):
        return norm(x)
    if mask is not None and norm.training:
        out = torch.zeros_like(x)  # (B, L, H)
        out[mask] = norm(x[mask])  # (n_real, H)
        return out
    return norm(x.flatten(0, 1)).view_as(x)  # (B, L, H)


def norm_step(norm, x_t):
    """The norm at one step. BatchNorm always uses its running statistics here (train or eval):
    one step has no sequence to average over. Shapes: x_t (B, H) -> (B, H)"""
    if isinstance(norm, nn.LayerNorm):
        return norm(x_t)
    return F.batch_norm(x_t, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)


class TiedDropout(nn.Module):
    """Dropout with one mask per (sequence, channel), shared by all L steps: the S4 code's
    DropoutNd / nn.Dropout1d on (B, H, L) and the S5 code's nn.Dropout(broadcast_dims=[0]).
    Kept entries are scaled by 1/(1-p); the identity in eval mode or when p = 0.

    Shapes: x (B, L, H) -> (B, L, H); the mask is (B, 1, H)
    """

    def __init__(self, p=0.0):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"dropout={p!r} is not allowed; expected a number in [0, 1)")
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], 1, x.shape[-1]).bernoulli_(1 - self.p)  # (B, 1, H)
        return x * keep / (1 - self.p)  # (B, L, H)

    def extra_repr(self):
        return f"p={self.p}"


class ResidualBlock(nn.Module):
    """One SSM layer in a residual block: (B, L, H) -> (B, L, H). See the module docstring.

    Args:
        d_model: H.
        layer: "s4d" | "dss" | "s5" | "s4"; layer_kwargs go to `make_layer` (channels must be 1).
        norm: "layer" (LayerNorm over H) | "batch" (BatchNorm1d over H, statistics over B and L).
        prenorm: x + f(norm(x)) if True, else norm(x + f(x)).
        activation: "gelu" | "glu" | "half_glu1" | "half_glu2" (module docstring).
        dropout: p of `TiedDropout`, applied after the GELU and after the output map.

    Variable lengths: `forward(x, lengths)` zeroes the padded steps of the block's input and of
    the SSM layer's input (a norm maps a zero step to a nonzero one, e.g. LayerNorm's bias).

    Stepping (`step`) is recurrent inference and behaves as eval mode in both modes: no dropout,
    and BatchNorm normalises with its running statistics (in eval mode BatchNorm is a fixed
    per-channel affine map, so step equals forward; in train mode forward uses batch statistics
    and step does not, and step never updates the running statistics). LayerNorm is per step, so
    step equals forward. The state is the SSM layer's state alone. A layer whose system depends
    on the sequence length (DSS-softmax: `layer.length_dependent`) is stepped with `L=`, the
    length of the sequence it serves; bidirectional layers cannot be stepped at all.

    `rate` (forward and step) multiplies the layer's dt: a change of sampling rate at inference
    (rate = 2 reads a signal sampled at half the training rate).

    Shapes: x (B, L, H) -> (B, L, H); lengths (B,) int; x_t (B, H); state: the layer's.
    """

    def __init__(self, d_model, layer="s4d", layer_kwargs=None, norm="layer", prenorm=True,
                 activation="gelu", dropout=0.0):
        super().__init__()
        if layer_kwargs is not None and not isinstance(layer_kwargs, Mapping):
            raise ValueError(f"layer_kwargs={layer_kwargs!r} must be None or a dict of the layer's options")
        layer_kwargs = dict(layer_kwargs or {})
        if layer_kwargs.get("channels", 1) != 1:
            raise ValueError(f"layer_kwargs channels={layer_kwargs['channels']!r} is not allowed in a block; "
                             f"allowed: 1 (the block maps H -> H)")
        check_choice("activation", activation, ACTIVATIONS)
        (prenorm,) = check_bools("ResidualBlock", prenorm=prenorm)
        self.d_model, self.prenorm, self.activation = d_model, prenorm, activation
        self.layer = make_layer(layer, d_model, **layer_kwargs)
        self.norm = make_norm(norm, d_model)
        self.out = nn.Linear(d_model, 2 * d_model if activation == "glu" else d_model)
        self.dropout = TiedDropout(dropout)

    def output(self, y, drop=True):
        """drop(out(drop(gelu(y)))) per step (the module docstring's table). y (..., H) -> (..., H)"""
        drop = self.dropout if drop else (lambda t: t)
        z = drop(F.gelu(y))  # (..., H)
        if self.activation == "gelu":
            v = self.out(z)
        elif self.activation == "glu":
            v = F.glu(self.out(z), dim=-1)  # (..., 2H) -> (..., H)
        elif self.activation == "half_glu1":
            v = z * torch.sigmoid(self.out(z))
        else:  # half_glu2: the gate sees GELU(y), the gated value is y itself
            v = y * torch.sigmoid(self.out(z))
        return drop(v)  # (..., H)

    def forward(self, x, lengths=None, rate=1.0, L=None):
        """`L`: the length a length-dependent layer's system is defined for (DSS-softmax; default x's
        length); the other layers ignore it. Shapes: x (B, L, H); lengths (B,) int or None -> (B, L, H)"""
        check_rate(rate)
        if not torch.is_tensor(x) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be (B, L, H) with H = d_model = {self.d_model}; got {got}")
        check_lengths(lengths, x.shape[0], x.shape[1])
        mask = None if lengths is None else step_mask(lengths, x.shape[1])  # (B, L)
        # Why zeroing the SSM's input suffices: the layers are linear and time-invariant, so
        # y_t = sum_{s<=t} K_fwd[t-s] u_s + sum_{s>=t} K_bwd[s-t] u_s + D u_t. The causal part of a
        # real step t < lengths[b] never sees the padding; the anti-causal part sums u_s for
        # s >= t, padding included, and the reverse scan starts from the zero state at the end,
        # so with u_s = 0 on the padding the backward pass reaches the last real step with
        # exactly the zero state it would have had without padding. All other maps act per step.
        x = zero_padding(x, mask)  # (B, L, H)
        z = norm_sequence(self.norm, x, mask) if self.prenorm else x  # (B, L, H)
        z = zero_padding(z, mask)  # the norm maps a zero step to its bias: zero it again
        x = x + self.output(self.layer(z, rate=rate, **self.length(L)))  # (B, L, H)
        return x if self.prenorm else norm_sequence(self.norm, x, mask)

    @property
    def length_dependent(self):
        """Whether the layer's system depends on the sequence length (DSS-softmax)."""
        return getattr(self.layer, "length_dependent", False)

    def length(self, L):
        """The layer's `L=` keyword: {"L": L} for a length-dependent layer, else none."""
        return {"L": L} if self.length_dependent else {}

    def default_state(self, batch_size):
        """The SSM layer's zero state (see the layer's `default_state`)."""
        return self.layer.default_state(batch_size)

    def step(self, x_t, state, rate=1.0, L=None):
        """One step of recurrent inference (class docstring: eval-mode semantics). `L` goes to a
        length-dependent layer (DSS-softmax, which needs it) and is unused by the others.

        Shapes: x_t (B, H); state: the layer's -> x_t (B, H), state
        """
        check_rate(rate)
        z = norm_step(self.norm, x_t) if self.prenorm else x_t  # (B, H)
        y, state = self.layer.step(z, state, rate=rate, **self.length(L))  # (B, H)
        x_t = x_t + self.output(y, drop=False)  # (B, H)
        return (x_t if self.prenorm else norm_step(self.norm, x_t)), state
