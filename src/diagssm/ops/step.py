"""One step of the per-channel diagonal SSM (S4D and DSS in recurrent form), for generation:

    x' = A_bar x + B_bar u_t,   y_t = factor Re(sum_m C x') + D u_t          (per channel h)

`diagonal_step_ref` composes it from PyTorch ops. On the CPU each of its ~10 small ops costs tens of
microseconds of dispatch and a pass over the (B, H, M) state, which made the SSM most of a model's
step (`diagssm bench`'s throughput rows). `diagonal_step` runs it as one call of the native kernel
`diag_step` (native.c: one read of the state, one write of the new one, the readout from cache)
where it can: on the CPU, complex64 state, float32 input, with nothing to differentiate (no autograd
graph is built through the kernel). Otherwise, and where the kernels are not built, it runs
`diagonal_step_ref`; it logs (INFO, on change) which of the two it runs and why.
"""
import logging

import torch

from . import chunked_native

log = logging.getLogger(__name__)
STEP = "diagonal step"  # the name under which `chunked_native.log_path` logs the path
NAMES = ("u_t", "state", "A_bar", "B_bar", "C", "D")


def _check(u_t, state, A_bar, B_bar, C, D):
    ts = (u_t, state, A_bar, B_bar, C, D)
    if not all(torch.is_tensor(t) for t in ts):
        raise TypeError("diagonal_step: u_t, state, A_bar, B_bar, C and D must be tensors")
    if u_t.dim() != 2 or A_bar.dim() != 2 or C.dim() != 3:
        raise ValueError(f"diagonal_step: u_t and A_bar must be 2-d, C 3-d; got {tuple(u_t.shape)}, "
                         f"{tuple(A_bar.shape)}, {tuple(C.shape)}")
    (Bsz, H), M, Cp = u_t.shape, A_bar.shape[1], C.shape[0]
    want = ((Bsz, H), (Bsz, H, M), (H, M), (H, M), (Cp, H, M), (Cp, H))
    if tuple(t.shape for t in ts) != want:
        got = ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(NAMES, ts))
        raise ValueError(f"diagonal_step: expected u_t (B, H), state (B, H, M), A_bar and B_bar (H, M), C (C', H, M), "
                         f"D (C', H); got {got}")


def unsupported(u_t, state, A_bar, B_bar, C, D):
    """Why `diagonal_step` cannot run these tensors on the native kernel ('' when it can)."""
    ts = (u_t, state, A_bar, B_bar, C, D)
    if not all(t.is_cpu for t in ts):
        return "CPU tensors only"
    if u_t.dtype != torch.float32 or D.dtype != torch.float32 or any(t.dtype != torch.complex64 for t in ts[1:5]):
        return f"float32 input with complex64 states only (got {u_t.dtype}, {state.dtype})"
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return "autograd: a tensor requires grad"
    return "" if chunked_native.available() else chunked_native.why_unavailable()


def diagonal_step(u_t, state, A_bar, B_bar, C, D, factor):
    """One step x' = A_bar x + B_bar u_t, y_t = factor Re(sum_m C x') + D u_t, on the native kernel
    where `unsupported` allows it, else `diagonal_step_ref` (module docstring).

    Shapes: u_t (B, H) real; state (B, H, M) complex; A_bar, B_bar (H, M) complex; C (C', H, M)
    complex; D (C', H) real; factor a number -> y_t (B, C', H), x' (B, H, M)
    """
    _check(u_t, state, A_bar, B_bar, C, D)
    why = unsupported(u_t, state, A_bar, B_bar, C, D)
    chunked_native.log_path(log, STEP, "native kernel", "PyTorch ops", why)
    if why:
        return diagonal_step_ref(u_t, state, A_bar, B_bar, C, D, factor)
    u_t, state, A_bar, B_bar, C, D = chunked_native.dense(u_t, state, A_bar, B_bar, C, D)
    (Bsz, H), M, Cp = u_t.shape, A_bar.shape[-1], C.shape[0]
    y, x = u_t.new_empty(Bsz, Cp, H), torch.empty_like(state)
    chunked_native.library().diag_step(y.data_ptr(), x.data_ptr(), u_t.data_ptr(), state.data_ptr(),
                                       A_bar.data_ptr(), B_bar.data_ptr(), C.data_ptr(), D.data_ptr(),
                                       float(factor), Bsz, H, M, Cp)
    return y, x


def diagonal_step_ref(u_t, state, A_bar, B_bar, C, D, factor):
    """Reference twin of `diagonal_step`: the recurrence and readout as PyTorch ops (differentiable)."""
    x = A_bar * state + B_bar * u_t[..., None]  # (B, H, M)
    y = factor * (C * x[:, None]).sum(-1).real + D * u_t[:, None]  # (B, C', H)
    return y, x
