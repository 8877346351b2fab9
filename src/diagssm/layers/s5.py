"""S5: the MIMO diagonal state space layer of Smith, Warrington and Linderman, "Simplified State
Space Layers for Sequence Modeling" (ICLR 2023), Section 3 (the S5 layer: structure, diagonalised
parameterisation, computation) and the variable-observation-interval experiment.

One state of size P is shared by all H channels (a multi-input, multi-output system):

    x'(t) = A x(t) + B u(t),  y(t) = C x(t) + D u(t),        A = V diag(Lambda) V^-1
    h_k = Lambda_bar h_(k-1) + B_bar u_k,  y_k = C_tilde h_k + D u_k      (diagonalised, discrete)
    ZOH:      Lambda_bar = exp(Lambda Delta),  B_bar = Lambda^-1 (Lambda_bar - 1) B_tilde
    bilinear: Lambda_bar = (1 + Delta Lambda/2) / (1 - Delta Lambda/2),  B_bar = Delta / (1 - Delta Lambda/2) B_tilde
    B_tilde = V^-1 B,  C_tilde = C V,  one learned Delta per mode

Lambda and V come from block-diagonal HiPPO-N (`init.hippo_n_blocks`). With conj_sym only the
M = P/2 modes with Im > 0 are stored and y_k = 2 Re(C_tilde h_k) + D u_k.

The recurrence is run by `ops.scan` (the paper runs it with a parallel scan). Because the system
is time-invariant, h is also the causal convolution of Bu with the per-mode kernel Lambda_bar^l,
computed by complex FFT (`ops.modal_conv`). Variable step sizes (irregularly sampled series)
give a time-varying Lambda_bar_k and force the scan.
"""
import logging

import torch
from torch import nn

from diagssm import init as inits
from diagssm.layers.base import (SSMLayer, as_complex, autocast_off, check_bools, check_positive_ints, check_rate,
                                 complex_parameter, log_uniform)
from diagssm.ops import chunked_native, discretize, modal_conv, s5_native, scan

log = logging.getLogger(__name__)

C_INITS = ("trunc_standard_normal", "lecun_normal", "complex_normal")
INITS = ("hippo_n", "rand")
MODES = ("scan", "conv", "auto")
_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2] (JAX's lecun_normal)


def lecun_normal(shape, fan_in):
    """JAX's lecun_normal: a standard normal truncated to [-2, 2], scaled to std 1/sqrt(fan_in). float64."""
    t = nn.init.trunc_normal_(torch.empty(shape, dtype=torch.float64), 0.0, 1.0, -2.0, 2.0)
    return t * (fan_in ** -0.5 / _TRUNC_STD)


def random_modes(P, blocks, conj_sym):
    """Lambda for init="rand": per block of size P/J, S4D-Rand eigenvalues -1/2 + i omega with
    omega ~ Uniform[0, pi (P/J) / 2) (`init.diagonal_init("rand")`, global RNG), sorted by Im;
    without conj_sym each block also holds the conjugates (Im increasing, like HiPPO-N's order).

    Shapes: returns Lambda (M,) complex128, M = P/2 with conj_sym else P
    """
    size = P // blocks
    out = []
    for _ in range(blocks):
        half = inits.diagonal_init("rand", size)  # (size/2,)
        half = half[torch.argsort(half.imag)]  # (size/2,)
        out.append(half if conj_sym else torch.cat([half.conj().flip(0), half]))
    return torch.cat(out)  # (M,)


def init_C(C_init, channels, H, V):
    """C_tilde (channels, H, M) complex128 (S5's `init_CV` and its C_init options).

    - "trunc_standard_normal": C (H, P) complex with Re, Im i.i.d. lecun_normal of fan-in P
      (std 1/sqrt(P)): S5's `trunc_standard_normal` samples each row of C as a (1, P, 2)
      lecun_normal array, whose JAX fan-in is P. Then C_tilde = C V.
    - "lecun_normal": C (H, P) complex, Re and Im std 1/sqrt(H P): S5 applies JAX's lecun_normal to
      the whole (H, P, 2) array, whose fan-in is P x H. Then C_tilde = C V.
    - "complex_normal": C_tilde sampled directly, Re and Im i.i.d. N(0, 1/2) (no V).
    """
    P, M = V.shape
    if C_init == "complex_normal":
        return torch.randn(channels, H, M, dtype=torch.complex128)  # (C', H, M), E|z|^2 = 1
    fan_in = P if C_init == "trunc_standard_normal" else P * H
    C = torch.view_as_complex(lecun_normal((channels, H, P, 2), fan_in))  # (C', H, P)
    return C @ V  # (C', H, M)


def in_weight(B):
    """The real (H, 2M) matrix of B u: B (M, H) complex -> [Re, Im] per mode, so that B u = u W."""
    return torch.view_as_real(B).permute(1, 0, 2).reshape(B.shape[1], -1)  # (H, 2M)


def out_weight(C):
    """The real (H, 2M) matrix of Re(C h): C (H, M) complex -> Re(C h) = [Re h, Im h] W^T."""
    return torch.stack([C.real, -C.imag], dim=-1).reshape(C.shape[0], -1)  # (H, 2M)


def mix_in(u, B):
    """B u for real u and complex B, as one real matmul. u (..., H), B (M, H) -> (..., M) complex."""
    return torch.view_as_complex((u @ in_weight(B)).unflatten(-1, (-1, 2)))  # (..., M)


def mix_out(h, C):
    """Re(C h) for complex h and C, as one real matmul. h (..., M), C (H, M) -> (..., H) real."""
    return torch.view_as_real(h).flatten(-2) @ out_weight(C).T  # (..., H)


class S5(SSMLayer):
    """S5 layer: (B, L, H) -> (B, L, H). The SSM and its D skip term only.

    Args:
        d_model: H, the number of input and output channels (one MIMO system).
        d_state: P, the size of the real state (= the HiPPO-N matrices' total size).
        blocks: J, the number of HiPPO-N blocks of size P/J on the diagonal of A. Default 1 (one
            HiPPO-N matrix of size P); the S5 code's training script defaults to 8, and its LRA
            scripts use 3-16 (e.g. ListOps P = 16 in 8 blocks, Path-X P = 256 in 16).
        conj_sym: store the M = P/2 modes with Im > 0 and output 2 Re(...) (needs P/J even);
            otherwise M = P modes and Re(...).
        C_init: "trunc_standard_normal" | "lecun_normal" | "complex_normal" (see `init_C`).
        init: "hippo_n" (the paper's block HiPPO-N) or "rand" (the ablation: the eigenvalues
            replaced by random S4D-Rand ones, `random_modes`; V, B and C drawn as for HiPPO-N).
        discretization: "zoh" | "bilinear".
        dt_min, dt_max: Delta = exp(log_dt) is initialised log-uniform in [dt_min, dt_max], per mode.
        clip_eigs: use Re Lambda = min(Lambda_re, -1e-4) (stable for unbounded lengths; S5's clip_eigs).
        bidirectional: add an anti-causal scan with its own C_tilde (no recurrent state then).
        mode: "scan" | "conv" | "auto" (below); a variable `dt` or `resets` always uses the scan.
        check_finite: reject NaN/inf inputs (costs one pass over u).

    Initialisation (S5's code): Lambda, V from `init.hippo_n_blocks`; B_tilde = V^-1 B with B (P, H)
    real lecun_normal as S5's JAX code draws it: JAX reads the fan-in of a (P, H) array as P, so
    the std is 1/sqrt(P) (not 1/sqrt(H)); C_tilde by `init_C`; D standard normal.

    Parameters (H = d_model, M = P/2 with conj_sym else P, C' = 2 if bidirectional else 1):
    Lambda_re (M,); Lambda_im (M,); log_dt (M,); B (M, H, 2) = B_tilde; C (C', H, M, 2) = C_tilde;
    D (H,). Count: 3 M + 2 M H (1 + C') + H.

    Variable steps (`forward(dt=...)`): Delta_(b,k) = rate * dt[b, k] * exp(log_dt), so dt is a
    per-step multiplier of the learned step (dt = 1 is the ordinary forward) and every step is
    discretised with its own Delta_(b,k): h_k = Lambda_bar_k h_(k-1) + B_bar_k u_k. `resets[b, k]`
    sets Lambda_bar_k = 0 (h_k = B_bar_k u_k: packed sequences). Bidirectional, the backward scan
    links k+1 -> k with Lambda_bar_(k+1), so a reset at k also cuts the backward pass at k-1 | k.

    Mode. The FFT convolution costs O(B M L log L) against the scan's O(B M L) in ~3 sqrt(L)
    Python steps. Forward+backward of the whole layer, float32, B=16, H=128, P=64 (M=32), CPU
    (2 cores shared with other jobs, load ~5, best of 7, wall s): L=1024 scan 0.049, conv 0.064;
    L=16384 scan 2.70, conv 3.14 (1 thread: 0.067 vs 0.118, 2.24 vs 3.86). "auto" therefore
    uses the scan on the CPU (those timings predate the fused op below, which widened the gap). On
    a GPU it uses the convolution when the system is time-invariant: forward + backward at the same
    sizes on an H100 (`diagssm bench --device cuda`, docs/benchmarks/layers-gpu-h100.md and
    -run1.md), conv 4.5, 4.1, 5.0, 17.2 ms against the scan's 8.3, 12.7, 21.2, 38.6 at L = 1024,
    4096, 16384, 65536 (run 1: 4.8, 4.6, 5.1, 17.4 against 9.4, 13.8, 22.3, 39.2); the scan's
    Python loop of ~3 sqrt(L) steps launches many small GPU kernels.

    Fused op. The time-invariant scan (no dt, no resets), one direction, float32 on the CPU, H and
    2M multiples of 16: the projections, the scan and the D u term run as one native op
    (`ops.s5_fused`, per batch row in cache-sized time blocks), and `forward` logs which path it
    takes and why. Forward + backward of the layer at B = 16, H = 128, P = 64, L = 16384 on 2
    cores: 118.6 and 122.6 ms in two runs of `diagssm bench` (README, "Layers"). The fused op
    alone took 96 ms against 250 ms for the same steps as PyTorch ops (267 with the loss piece),
    in the cleaner of two runs of `benchmarks/bench_s5.py` (the other: 196 vs 482 with the loss,
    this VM's page faults on fresh memory). Otherwise (bidirectional, dt or resets, float64, a
    GPU, no C compiler) the PyTorch ops as written below. A bidirectional layer as two fused ops
    (the second over the reversed input) was slower than its PyTorch ops, which share B u between
    the two scans: 571 and 740 ms against 490 and 503 (`benchmarks/bench_s5.py --layer
    --bidirectional`, two runs each, session 15, on a 2-core AVX2 machine).

    Shapes: u (B, L, H) -> y (B, L, H); state (B, M) complex; dt (B, L) >= 0; resets (B, L) bool.
    """

    # given their own learning rate and no weight decay by diagssm.optim.param_groups
    ssm_params = ("log_dt", "Lambda_re", "Lambda_im", "B")

    def __init__(self, d_model, d_state, blocks=1, conj_sym=True, C_init="trunc_standard_normal",
                 discretization="zoh", dt_min=1e-3, dt_max=1e-1, clip_eigs=False, bidirectional=False,
                 mode="auto", check_finite=True, init="hippo_n"):
        super().__init__()
        check_positive_ints("S5", d_model=d_model)
        conj_sym, clip_eigs, bidirectional, check_finite = check_bools(
            "S5", conj_sym=conj_sym, clip_eigs=clip_eigs, bidirectional=bidirectional, check_finite=check_finite)
        if C_init not in C_INITS:
            raise ValueError(f"C_init={C_init!r}; allowed: {C_INITS}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {MODES}")
        if init not in INITS:
            raise ValueError(f"init={init!r}; allowed: {INITS}")
        discretize(torch.tensor(-1.0), torch.tensor(0.1), discretization)  # validates the name
        Lambda, V, Vinv = inits.hippo_n_blocks(d_state, blocks, conj_sym)  # (M,), (P, M), (M, P)
        if init == "rand":
            Lambda = random_modes(d_state, blocks, conj_sym)  # (M,)
        self.init = init
        H, M = d_model, Lambda.shape[0]
        self.d_model, self.d_state, self.n_modes, self.blocks = d_model, d_state, M, blocks
        self.conj_sym, self.C_init, self.discretization = conj_sym, C_init, discretization
        self.clip_eigs, self.bidirectional, self.mode, self.check_finite = clip_eigs, bidirectional, mode, check_finite
        self.factor = 2 if conj_sym else 1
        self.log_dt = nn.Parameter(torch.log(log_uniform(M, dt_min, dt_max)).float())  # (M,)
        self.Lambda_re = nn.Parameter(Lambda.real.float().contiguous())  # (M,)
        self.Lambda_im = nn.Parameter(Lambda.imag.float().contiguous())  # (M,)
        B = lecun_normal((d_state, H), fan_in=d_state).to(torch.complex128)  # (P, H), JAX's fan-in of (P, H)
        self.B = complex_parameter(Vinv @ B)  # (M, H, 2)
        self.C = complex_parameter(init_C(C_init, 1 + bidirectional, H, V))  # (C', H, M, 2)
        self.D = nn.Parameter(torch.randn(H))  # (H,)

    def Lambda(self):
        """The diagonal of the state matrix, (M,) complex."""
        real = self.Lambda_re.clamp(max=-1e-4) if self.clip_eigs else self.Lambda_re
        return torch.complex(real, self.Lambda_im)  # (M,)

    def discrete(self, rate=1.0, dt=None):
        """(Lambda_bar, B_scale) with B_bar = B_scale[..., None] * B_tilde: (M,), or (B, L, M) given dt (B, L)."""
        Delta = torch.exp(self.log_dt) * check_rate(rate)  # (M,)
        if dt is not None:
            Delta = dt[..., None] * Delta  # (B, L, M)
        return discretize(self.Lambda(), Delta, self.discretization)

    def default_state(self, batch_size):
        """The zero state, (B, M) complex (complex64 for float32 parameters, complex128 for float64)."""
        return self.zero_state(batch_size, self.n_modes)

    @chunked_native.eager  # runs as it is inside a compiled model (README, torch.compile)
    @autocast_off
    def forward(self, u, state=None, return_state=False, rate=1.0, dt=None, resets=None, L=None):
        """y_k = factor Re(C_tilde h_k) + D u_k with h_k = Lambda_bar_k h_(k-1) + B_bar_k u_k, h_(-1) = state.

        `rate` scales the step (a change of sampling rate); `dt` multiplies it per step (class
        docstring); `resets[b, k]` restarts the state at step k: h_k = B_bar_k u_k. `L` is accepted
        for interface parity with the other layers and unused (S5 does not depend on it).

        Shapes:
            u: (B, L, H); state: (B, M) complex or None (zero); dt: (B, L) or None; resets: (B, L) bool
            returns y (B, L, H), and the final state h_(L-1) (B, M) when return_state
        """
        self.check_input(u)
        Bsz, L, _ = u.shape
        check_bools(type(self).__name__, return_state=return_state)
        if state is not None or return_state:
            self.check_recurrent()
        if state is not None:
            self.check_state(state, Bsz)
        dt, resets = self._check_steps(dt, resets, u)
        time_varying = dt is not None or resets is not None
        run = modal_conv if self._use_conv(time_varying, u.device) else scan
        A_bar, B_scale = self.discrete(rate, dt)  # (M,) or (B, L, M)
        C = as_complex(self.C)  # (C', H, M)
        if B_scale.dim() == 1:  # time-invariant: scale B (M, H), not Bu (B, L, M): one pass over Bu less
            B_bar = B_scale[:, None] * as_complex(self.B)  # (M, H)
            if run is scan and resets is None:
                W_in = in_weight(B_bar)  # (H, 2M)
                why = "bidirectional" if self.bidirectional else s5_native.unsupported(u, W_in)
                chunked_native.log_path(log, chunked_native.S5_SCAN, "fused native op (ops.s5_native)", "PyTorch ops",
                                        why)
                if not why:  # projections, scan and skip term fused, one pass over u and y
                    y, last = s5_native.apply_on_lanes(u, W_in, A_bar, out_weight(self.factor * C[0]), self.D,
                                                       state)
                    return (y, last) if return_state else y
            Bu = mix_in(u, B_bar)  # (B, L, M)
        else:
            Bu = B_scale * mix_in(u, as_complex(self.B))  # (B, L, M)
        if resets is not None:
            A_bar = torch.where(resets[..., None], torch.zeros_like(A_bar), A_bar)  # (B, L, M)
        h = run(A_bar, Bu, state)  # (B, L, M)
        y = mix_out(h, self.factor * C[0]).addcmul_(u, self.D)  # (B, L, H); in place: no pass over a new tensor
        if self.bidirectional:
            if time_varying:  # the backward step k+1 -> k uses the factor of the forward step k -> k+1
                A_bar = torch.cat([A_bar[:, 1:], torch.zeros_like(A_bar[:, :1])], dim=1)  # (B, L, M)
            y = y + mix_out(run(A_bar, Bu, None, reverse=True), self.factor * C[1])  # (B, L, H)
        return (y, h[:, -1]) if return_state else y

    def _use_conv(self, time_varying, device):
        """Whether to run the FFT convolution: mode="conv", or "auto" for a time-invariant system on a
        GPU (faster there at every length measured; the scan on the CPU: S5.__doc__). The choice is
        logged when it changes and recorded in `self.last_mode`."""
        if self.mode not in MODES:  # set after construction (layer.mode = ...)
            raise ValueError(f"S5: mode={self.mode!r}; allowed: {MODES}")
        if self.mode == "conv" and time_varying:
            raise ValueError("mode='conv' needs a time-invariant system: with dt or resets given, "
                             "use mode='scan' or 'auto'")
        auto = "conv" if device.type == "cuda" and not time_varying else "scan"
        mode = auto if self.mode == "auto" else self.mode
        if mode != getattr(self, "last_mode", None):
            log.info("S5: %s on %s%s", mode, device, " (mode='auto')" if self.mode == "auto" else "")
            self.last_mode = mode
        return mode == "conv"

    def _check_steps(self, dt, resets, u):
        Bsz, L, _ = u.shape
        if dt is not None:
            if not torch.is_tensor(dt) or dt.shape != (Bsz, L) or not dt.is_floating_point():
                got = (tuple(dt.shape), dt.dtype) if torch.is_tensor(dt) else type(dt).__name__
                raise ValueError(f"dt must be a real floating tensor of shape (B, L) = {(Bsz, L)}; got {got}")
            dt = dt.to(self.param_dtype())
            if not (torch.isfinite(dt) & (dt >= 0)).all():
                raise ValueError("dt must be finite and >= 0 (it multiplies the learned step size)")
        if resets is not None:
            if not torch.is_tensor(resets) or resets.shape != (Bsz, L) or resets.dtype != torch.bool:
                got = (tuple(resets.shape), resets.dtype) if torch.is_tensor(resets) else type(resets).__name__
                raise ValueError(f"resets must be a bool tensor of shape (B, L) = {(Bsz, L)}; got {got}")
        return dt, resets

    @chunked_native.eager  # runs as it is inside a compiled model (README, torch.compile)
    @autocast_off
    def step(self, u_t, state, rate=1.0, L=None):
        """One step of the recurrence: h = Lambda_bar state + B_bar u_t, y_t = factor Re(C_tilde h) + D u_t.
        `L`: as `forward`'s, unused.

        Shapes: u_t (B, H); state (B, M) complex -> y_t (B, H), state (B, M)
        """
        self.check_recurrent()
        self.check_input(u_t, "u_t")
        self.check_state(state, u_t.shape[0])
        A_bar, W_in, W_out = self.step_system(rate)  # (M,), (H, 2M), (H, 2M)
        return s5_native.s5_step(u_t, state, A_bar, W_in, W_out, self.D)  # (B, H), (B, M)

    def step_system(self, rate):
        """(Lambda_bar, W_in, W_out) for `step`: B_bar u = u W_in and factor Re(C_tilde h) = [Re h, Im h]
        W_out^T as real matrices (`in_weight`, `out_weight`), reused in inference (`inference_cached`)."""
        def build():
            A_bar, B_scale = self.discrete(rate)  # (M,)
            W_in = in_weight(B_scale[:, None] * as_complex(self.B))  # (H, 2M)
            W_out = out_weight(self.factor * as_complex(self.C)[0])  # (H, 2M)
            return chunked_native.dense(A_bar, W_in, W_out)
        return self.inference_cached(rate, build)
