"""One step of the per-channel diagonal SSM (S4D and DSS in recurrent form), for generation:

    x' = A_bar x + B_bar u_t,   y_t = factor Re(sum_m C x') + D u_t          (per channel h)

`diagonal_step_ref` composes it from PyTorch ops. On the CPU each of its ~10 small ops costs tens of
microseconds of dispatch and a pass over the (B, H, M) state, which made the SSM most of a model's
step (`diagssm bench`'s throughput rows). `diagonal_step` runs it as one call of the native kernel
`diag_step` (native.c: one read of the state, one write of the new one, the readout from cache)
where it can: on the CPU, complex64 state, float32 input, with nothing to differentiate (no autograd
graph is built through the kernel). Otherwise, and where the kernels are not built, it runs
`diagonal_step_ref`; it logs (INFO, on change) which of the two it runs and why.

`dplr_step` does the same for S4's bilinear step through its diagonal-plus-low-rank structure
(`dplr_step` in native.c; twin `dplr_step_ref`).
"""
import logging

import torch

from . import chunked_native
from .chunked_native import ptr

log = logging.getLogger(__name__)
STEP, DPLR_STEP = "diagonal step", "S4 (DPLR) step"  # the names under which `chunked_native.log_path` logs
NAMES = ("u_t", "state", "A_bar", "B_bar", "C", "D")


def _want(u_t, state, A_bar, B_bar, C, D):
    (Bsz, H), M, Cp = u_t.shape, A_bar.shape[1], C.shape[0]
    return (Bsz, H), (Bsz, H, M), (H, M), (H, M), (Cp, H, M), (Cp, H)


def _check(*ts):
    chunked_native.check_step_args("diagonal_step", NAMES, ts, (2, 3, 2, 2, 3, 2), _want,
                                   "u_t (B, H), state (B, H, M), A_bar and B_bar (H, M), C (C', H, M), D (C', H)")


def unsupported(u_t, state, A_bar, B_bar, C, D):
    """Why `diagonal_step` cannot run these tensors on the native kernel ('' when it can)."""
    return chunked_native.step_unsupported((u_t, D), (state, A_bar, B_bar, C))


def diagonal_step(u_t, state, A_bar, B_bar, C, D, factor):
    """One step x' = A_bar x + B_bar u_t, y_t = factor Re(sum_m C x') + D u_t, on the native kernel
    where `unsupported` allows it, else `diagonal_step_ref` (module docstring).

    Shapes: u_t (B, H) real; state (B, H, M) complex; A_bar, B_bar (H, M) complex; C (C', H, M)
    complex; D (C', H) real; factor a number -> y_t (B, C', H), x' (B, H, M)
    """
    _check(u_t, state, A_bar, B_bar, C, D)
    why = unsupported(u_t, state, A_bar, B_bar, C, D)
    return chunked_native.step_path(log, STEP, why, diagonal_step_ref, _diagonal_step_native,
                                    u_t, state, A_bar, B_bar, C, D, factor)


@chunked_native.eager
def _diagonal_step_native(u_t, state, A_bar, B_bar, C, D, factor):
    u_t, state, A_bar, B_bar, C, D = chunked_native.dense(u_t, state, A_bar, B_bar, C, D)
    (Bsz, H), M, Cp = u_t.shape, A_bar.shape[-1], C.shape[0]
    y, x = u_t.new_empty(Bsz, Cp, H), torch.empty_like(state)
    chunked_native.library().diag_step(ptr(y), ptr(x), ptr(u_t), ptr(state),
                                       ptr(A_bar), ptr(B_bar), ptr(C), ptr(D),
                                       float(factor), Bsz, H, M, Cp)
    return y, x


def diagonal_step_ref(u_t, state, A_bar, B_bar, C, D, factor):
    """Reference twin of `diagonal_step`: the recurrence and readout as PyTorch ops (differentiable)."""
    x = A_bar * state + B_bar * u_t[..., None]  # (B, H, M)
    y = factor * (C * x[:, None]).sum(-1).real + D * u_t[:, None]  # (B, C', H)
    return y, x


# ---------------------------------------------------------------- S4's bilinear DPLR step
DPLR_NAMES = ("u_t", "state", "E", "Pc2", "Ph", "dB", "d", "Pd2", "inv", "dPh", "C", "D")
MAX_RANK = 8  # native.c's RMAX


def _want_dplr(u_t, state, E, Pc2, Ph, dB, d, Pd2, inv, dPh, C, D):
    (Bsz, H), M, R, Cp = u_t.shape, E.shape[1], Pc2.shape[0], C.shape[0]
    hm, rhm = (H, M), (R, H, M)
    return (Bsz, H), (Bsz, H, M), hm, rhm, rhm, hm, hm, rhm, (H, R, R), rhm, (Cp, H, M), (Cp, H)


def _check_dplr(ts):
    chunked_native.check_step_args("dplr_step", DPLR_NAMES, ts, (2, 3, 2, 3, 3, 2, 2, 3, 3, 3, 3, 2), _want_dplr,
                                   "u_t (B, H), state (B, H, M), E, dB, d (H, M), Pc2, Ph, Pd2, dPh (r, H, M), "
                                   "inv (H, r, r), C (C', H, M), D (C', H)")


def dplr_unsupported(u_t, state, E, Pc2, Ph, dB, d, Pd2, inv, dPh, C, D):
    """Why `dplr_step` cannot run these tensors on the native kernel ('' when it can)."""
    if Pc2.shape[0] > MAX_RANK:
        return f"rank {Pc2.shape[0]} > {MAX_RANK}"
    return chunked_native.step_unsupported((u_t, inv, D), (state, E, Pc2, Ph, dB, d, Pd2, dPh, C))


def dplr_step(u_t, state, E, Pc2, Ph, dB, d, Pd2, inv, dPh, C, D):
    """One bilinear step of S4 through its diagonal-plus-low-rank structure (`layers.S4.step`), with
    the terms of `S4.step_system`:
        q0 = 2 Re(P^H x),  rhs = E x - dt/2 P q0 + dt B u_t,  q = inv 2 Re(P^H d rhs),
        x' = d rhs - d dt/2 P q,  y_t = 2 Re(C x') + D u_t
    (E = 1 + dt/2 Lambda, d = 1/(1 - dt/2 Lambda), inv the inverse of I + dt Re(P^H d P)), on the
    native kernel where `dplr_unsupported` allows it, else `dplr_step_ref`.

    Shapes: u_t (B, H) real; state (B, H, M) complex; E, dB, d (H, M) and Pc2 = 2 conj(P), Ph = dt/2 P,
    Pd2 = 2 conj(P) d, dPh = d dt/2 P (r, H, M) complex; inv (H, r, r) real; C (C', H, M) complex;
    D (C', H) real -> y_t (B, C', H), x' (B, H, M)
    """
    ts = (u_t, state, E, Pc2, Ph, dB, d, Pd2, inv, dPh, C, D)
    _check_dplr(ts)
    why = dplr_unsupported(*ts)
    return chunked_native.step_path(log, DPLR_STEP, why, dplr_step_ref, _dplr_step_native, *ts)


@chunked_native.eager
def _dplr_step_native(*ts):
    ts = chunked_native.dense(*ts)
    u_t, E, Pc2, C = ts[0], ts[2], ts[3], ts[10]
    (Bsz, H), M, R, Cp = u_t.shape, E.shape[1], Pc2.shape[0], C.shape[0]
    y, x = ts[0].new_empty(Bsz, Cp, H), torch.empty_like(ts[1])
    chunked_native.library().dplr_step(ptr(y), ptr(x), *(ptr(t) for t in ts), Bsz, H, M, R, Cp)
    return y, x


def dplr_step_ref(u_t, state, E, Pc2, Ph, dB, d, Pd2, inv, dPh, C, D):
    """Reference twin of `dplr_step`, as PyTorch ops (differentiable)."""
    q0 = torch.einsum("shm,bhm->bhs", Pc2, state).real  # (B, H, r): 2 Re(P^H x)
    rhs = E * state - torch.einsum("bhs,shm->bhm", q0.to(state.dtype), Ph) + dB * u_t[..., None]  # (B, H, M)
    q = torch.einsum("hst,bht->bhs", inv, torch.einsum("shm,bhm->bhs", Pd2, rhs).real)  # (B, H, r)
    x = d * rhs - torch.einsum("bhs,shm->bhm", q.to(rhs.dtype), dPh)  # (B, H, M)
    return 2 * (C * x[:, None]).sum(-1).real + D * u_t[:, None], x  # (B, C', H), (B, H, M)
