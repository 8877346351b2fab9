"""S4D: the diagonal state space layer of Gu, Gupta, Goel and Re, "On the Parameterization and
Initialization of Diagonal State Space Models" (NeurIPS 2022), Sections 3-4 and Algorithm 1.

    x'(t) = A x(t) + B u(t),  y(t) = C x(t) + D u(t),  A diagonal, N/2 conjugate pairs
    K[l] = 2 Re sum_n C_n B_bar_n A_bar_n^l   (eq. (5)),   y = K * u + D u
"""
import torch
from torch import nn

from diagssm import init as inits
from diagssm.layers.base import (DiagonalSSM, as_complex, check_backend, check_bools, check_even_state,
                                 check_positive_ints, check_rate, complex_parameter, log_uniform)
from diagssm.ops import discretize, s4d_kernel

REAL_TRANSFORMS = ("exp", "relu", "none")


class S4D(DiagonalSSM):
    """S4D layer: (B, L, H) -> (B, L, H). The SSM and its D skip term only.

    Args:
        d_model: H, the number of channels (independent SISO systems).
        d_state: N, the size of the real HiPPO matrix mirrored; N/2 complex modes are stored.
        init: A's initialisation, "legs" | "inv" | "lin" | "real" | "rand" (`init.diagonal_init`).
            "legs" also sets B = V^H B_HiPPO (the projected HiPPO input vector); otherwise B = 1.
            "rand" draws its frequencies for each channel.
        discretization: "zoh" | "bilinear".
        real_transform: Re A = -exp(log_A_real) | -(relu(neg_A_real) + 1e-4) | -neg_A_real.
        dt_min, dt_max: dt is initialised log-uniform in [dt_min, dt_max].
        channels: number of output channels C'' (C is (C'', H, N/2)); the output is (B, L, C'' H).
        bidirectional: add an anti-causal kernel with its own C (no recurrent state then).
        check_finite: reject NaN/inf inputs (costs one pass over u).
        backend: "fft" (kernel + FFT convolution) | "chunked" (chunked matrix multiplies,
            `ops.chunked`) | "auto" (chunked on the CPU, fft elsewhere; see `pick_backend`).
        train_B: learn B (the S4 code's S4D) or keep it at its initial value as a buffer (the
            minimal S4D, where B = 1 is folded into C; with "legs", B stays the HiPPO projection).

    Parameters (H = d_model, N = d_state): log_dt (H,); log_A_real or neg_A_real (H, N/2);
    A_imag (H, N/2); B (H, N/2, 2) (a buffer when train_B=False); C (C', H, N/2, 2) with
    C' = channels (x2 bidirectional); D (channels, H).
    Count: H (1 + N (1 + train_B + C') + channels).

    Shapes: u (B, L, H) -> y (B, L, channels H); state (B, H, N/2) complex.
    """

    # given their own learning rate and no weight decay by diagssm.optim.param_groups
    ssm_params = ("log_dt", "log_A_real", "neg_A_real", "A_imag", "B")

    def __init__(self, d_model, d_state=64, init="legs", discretization="zoh", real_transform="exp",
                 dt_min=1e-3, dt_max=1e-1, channels=1, bidirectional=False, check_finite=True, backend="auto",
                 train_B=True):
        super().__init__()
        check_even_state(d_state, "S4D")
        check_positive_ints("S4D", d_model=d_model, channels=channels)
        self.backend = check_backend(backend, "S4D")
        if real_transform not in REAL_TRANSFORMS:
            raise ValueError(f"real_transform={real_transform!r}; allowed: {REAL_TRANSFORMS}")
        discretize(torch.tensor(-1.0), torch.tensor(0.1), discretization)  # validates the name
        self.d_model, self.d_state, self.n_modes = d_model, d_state, d_state // 2
        self.init, self.discretization, self.real_transform = init, discretization, real_transform
        bidirectional, check_finite, train_B = check_bools("S4D", bidirectional=bidirectional,
                                                           check_finite=check_finite, train_B=train_B)
        self.channels, self.bidirectional, self.check_finite = channels, bidirectional, check_finite
        H, M = d_model, self.n_modes
        if init == "rand":  # frequencies drawn for each channel, as the S4 code's random imaginary parts
            A = torch.stack([inits.diagonal_init(init, d_state) for _ in range(H)])  # (H, M)
        else:
            A = inits.diagonal_init(init, d_state).expand(H, M)  # (H, M)
        B = inits.hippo_legs_B(d_state) if init == "legs" else torch.ones(M, dtype=torch.complex128)
        self.log_dt = nn.Parameter(torch.log(log_uniform(H, dt_min, dt_max)).float())  # (H,)
        if real_transform == "exp":
            self.log_A_real = nn.Parameter(torch.log(-A.real).float())  # (H, M)
        else:
            self.neg_A_real = nn.Parameter((-A.real).float().contiguous())  # (H, M)
        self.A_imag = nn.Parameter(A.imag.float().contiguous())  # (H, M)
        if train_B:
            self.B = complex_parameter(B.expand(H, M))  # (H, M, 2)
        else:  # fixed at its initial value, as in the minimal S4D (B folded into C)
            self.register_buffer("B", torch.view_as_real(B.expand(H, M).to(torch.complex64)).clone())  # (H, M, 2)
        self.train_B = train_B
        self.C = complex_parameter(torch.randn(channels * (1 + bidirectional), H, M, dtype=torch.complex64))
        self.D = nn.Parameter(torch.randn(channels, H))  # (channels, H)

    def A(self):
        """The diagonal of the state matrix, (H, N/2) complex, Re A < 0 (for exp and relu)."""
        if self.real_transform == "exp":
            real = -torch.exp(self.log_A_real)
        else:
            # relu: the S4 code's floor of 1e-4 keeps Re A < 0
            real = -(torch.relu(self.neg_A_real) + 1e-4) if self.real_transform == "relu" else -self.neg_A_real
        return torch.complex(real, self.A_imag)  # (H, M)

    def dt(self, rate=1.0):
        return torch.exp(self.log_dt) * check_rate(rate)  # (H,)

    def kernel(self, L, rate=1.0):
        """K (C', H, L) = 2 Re sum_n C B_bar A_bar^l."""
        return s4d_kernel(self.A(), as_complex(self.B), as_complex(self.C), self.dt(rate), L, self.discretization)

    def system(self, L=None, rate=1.0):
        """(log A_bar, B_bar, C): (H, M), (H, M), (C', H, M) complex."""
        A, dt = self.A(), self.dt(rate)[:, None]  # (H, M), (H, 1)
        A_bar, B_scale = discretize(A, dt, self.discretization)  # (H, M)
        w = A * dt if self.discretization == "zoh" else torch.log(A_bar)
        return w, B_scale * as_complex(self.B), as_complex(self.C)
