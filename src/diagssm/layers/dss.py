"""DSS: Gupta, Gu and Berant, "Diagonal State Spaces are as Effective as Structured State
Spaces" (NeurIPS 2022), Proposition 1 and Section 3.

    K[h, l] = Re sum_n W[h,n] (exp(dt Lambda_n) - 1)/Lambda_n exp(dt Lambda_n l)     (DSS-EXP)
    K[h, l] = Re sum_n W[h,n] / Lambda_n softmax_l(dt Lambda_n l)                    (DSS-SOFTMAX)

The paper counts complex modes: its "N = 64" is d_state = 128 here (N/2 = 64 modes), and there
is no conjugate-pair factor in the kernel.
"""
import math

import torch
from torch import nn

from diagssm import init as inits
from diagssm.layers.base import (DiagonalSSM, as_complex, check_backend, check_bools, check_even_state,
                                 check_positive_ints, check_rate, log_uniform)
from diagssm.ops import dss_kernel
from diagssm.ops.kernels import DSS_VARIANTS, EPS_RECIPROCAL, dss_exponent, reciprocal

SEP_DT_INITS = ("tied", "independent")


class DSS(DiagonalSSM):
    """DSS layer: (B, L, H) -> (B, L, H). The SSM and its D skip term only.

    Args:
        d_model: H.
        d_state: 2x the number of complex modes (see the module docstring); Lambda has d_state/2.
        variant: "exp" (Re Lambda = -exp(log_Lambda_re) < 0) | "softmax" (Lambda free).
        sep_dt: separate step sizes for Re and Im of Lambda (the DSS code's default): log_dt (2, H).
        sep_dt_init: with sep_dt, "tied" (both rows start from one draw per channel, as the DSS code)
            or "independent" (a draw each: a mode can start slowly decaying and fast oscillating;
            this library's init before session 26, docs/RESULTS.md; needs sep_dt).
        dt_min, dt_max, channels, bidirectional, check_finite, backend: as in S4D.

    Lambda (shared by all channels) starts at Skew-HiPPO, the spectrum of the normal part of
    HiPPO-LegS (`init.diagonal_init("legs", d_state)`); Re W and Im W are standard normal (the DSS
    code's draw). With `sep_dt` the two step sizes of a channel start equal (one log-uniform draw,
    as in the DSS code) and part only in training.

    Recurrent view (DSS paper, Sec. 3.4): x_k = exp(w) x_{k-1} + B_bar u_k, y_k = Re(W x_k) + D u_k
    with w = dt Lambda. EXP: B_bar = (exp(w) - 1)/Lambda. SOFTMAX: the softmax normaliser
    sum_{j<L} exp(w j) depends on the length L, so B_bar does too, and `step(u_t, state, L=...)`
    must be told the maximum length L it serves; its outputs then equal the convolution's on
    sequences of length L (`forward(u, L=...)` likewise fixes L when a sequence is split). A mode
    with Re(w) > 0 is rescaled by exp(-w (L-1)), which is exact but would underflow in float32 for
    long L; when its growth exp(Re w (L-1)) passes exp(44)
    (float32; exp(354) in float64), "auto" uses the fft backend, and backend="chunked", `step`
    and states in or out are errors (`recurrent_problem`).

    Parameters: log_dt (H,) or (2, H); log_Lambda_re or Lambda_re (N/2,); Lambda_im (N/2,);
    W (C', H, N/2, 2); D (channels, H). Count: (1 + sep_dt) H + N + C' H N + channels H.

    Shapes: u (B, L, H) -> y (B, L, channels H); state (B, H, N/2) complex.
    """

    factor = 1

    # given their own learning rate and no weight decay by diagssm.optim.param_groups
    ssm_params = ("log_dt", "log_Lambda_re", "Lambda_re", "Lambda_im", "W")

    def __init__(self, d_model, d_state=128, variant="exp", sep_dt=True, dt_min=1e-3, dt_max=1e-1,
                 channels=1, bidirectional=False, check_finite=True, backend="auto", sep_dt_init="tied"):
        super().__init__()
        check_even_state(d_state, "DSS")
        check_positive_ints("DSS", d_model=d_model, channels=channels)
        self.backend = check_backend(backend, "DSS")
        if variant not in DSS_VARIANTS:
            raise ValueError(f"variant={variant!r}; allowed: {DSS_VARIANTS}")
        if sep_dt_init not in SEP_DT_INITS:
            raise ValueError(f"sep_dt_init={sep_dt_init!r}; allowed: {SEP_DT_INITS}")
        self.d_model, self.d_state, self.n_modes = d_model, d_state, d_state // 2
        sep_dt, bidirectional, check_finite = check_bools("DSS", sep_dt=sep_dt, bidirectional=bidirectional,
                                                          check_finite=check_finite)
        if sep_dt_init == "independent" and not sep_dt:  # one step size per channel: nothing to draw apart
            raise ValueError("DSS(sep_dt_init='independent') needs sep_dt=True (two step sizes per channel)")
        self.variant, self.sep_dt, self.sep_dt_init = variant, sep_dt, sep_dt_init
        self.length_dependent = variant == "softmax"
        self.channels, self.bidirectional, self.check_finite = channels, bidirectional, check_finite
        H, M = d_model, self.n_modes
        Lambda = inits.diagonal_init("legs", d_state)  # (M,)
        log_dt = torch.log(log_uniform((2, H) if sep_dt_init == "independent" else H, dt_min, dt_max))
        if sep_dt and sep_dt_init == "tied":  # one draw for both, parting in training: the DSS code's tile(2)
            log_dt = log_dt.expand(2, H)  # (2, H) with sep_dt, else (H,)
        self.log_dt = nn.Parameter(log_dt.float().contiguous())
        if variant == "exp":
            self.log_Lambda_re = nn.Parameter(torch.log(-Lambda.real).float())  # (M,)
        else:
            self.Lambda_re = nn.Parameter(Lambda.real.float().contiguous())  # (M,)
        self.Lambda_im = nn.Parameter(Lambda.imag.float().contiguous())  # (M,)
        # Re W and Im W each standard normal (E|W|^2 = 2), as the DSS code's randn(..., 2)
        self.W = nn.Parameter(torch.randn(channels * (1 + bidirectional), H, M, 2))  # (C', H, M, 2)
        self.D = nn.Parameter(torch.randn(channels, H))  # (channels, H)

    def Lambda(self):
        real = -torch.exp(self.log_Lambda_re) if self.variant == "exp" else self.Lambda_re
        return torch.complex(real, self.Lambda_im)  # (M,)

    def dt(self, rate=1.0):
        return torch.exp(self.log_dt) * check_rate(rate)  # (H,) or (2, H)

    def kernel(self, L, rate=1.0):
        W = as_complex(self.W)  # (C', H, M)
        Lambda, dt = self.Lambda(), self.dt(rate)
        return torch.stack([dss_kernel(Lambda, W_c, dt, L, self.variant) for W_c in W.unbind(0)])  # (C', H, L)

    def system(self, L=None, rate=1.0):
        """(w, B_bar, W): (H, M), (H, M), (C', H, M). SOFTMAX needs the length L."""
        Lambda = self.Lambda()  # (M,)
        w = dss_exponent(Lambda, self.dt(rate))  # (H, M)
        if self.variant == "exp":
            return w, torch.expm1(w) / Lambda, as_complex(self.W)
        if L is None:
            raise ValueError("DSS-softmax: its input scaling depends on the sequence length; "
                             "pass L= (the maximum length served) to step")
        grows = w.real > 0
        w_dec = torch.where(grows, -w, w)  # the kernel's sum runs from the end for growing modes
        B_bar = -torch.expm1(w_dec) * reciprocal(Lambda * -torch.expm1(w_dec * L), EPS_RECIPROCAL)
        # exp(-w (L-1)) for the growing modes only: computed for all, the decaying ones overflow
        # (exp(+|Re w| (L-1))) and torch.where's backward turns 0 * inf into NaN
        B_bar = B_bar * torch.exp(-torch.where(grows, w, torch.zeros_like(w)) * (L - 1))  # (H, M)
        return w, B_bar, as_complex(self.W)

    def recurrent_problem(self, L, rate):
        """SOFTMAX with a growing mode (Re w > 0): B_bar holds exp(-w (L-1)) and the gradient of
        B_bar is of order exp(Re w (L-1)). Past half the dtype's exponent range (exp(44) in
        float32) B_bar underflows towards 0 (outputs silently wrong) and its gradient overflows.
        The FFT path, whose kernel sums every mode from its decaying end, has neither problem."""
        if self.variant != "softmax":
            return ""
        w = dss_exponent(self.Lambda(), self.dt(rate)).detach()  # (H, M)
        growth = float(w.real.max().clamp(min=0)) * (L - 1)
        limit = math.log(torch.finfo(self.log_dt.dtype).max) / 2
        if growth <= limit:
            return ""
        return (f"softmax variant: a mode grows by exp({growth:.0f}) over L={L}, past what the recurrent "
                f"form holds in {self.log_dt.dtype} (exp({limit:.0f}))")
