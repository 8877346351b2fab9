"""Discretisation of a diagonal continuous-time system x' = A x + B u, elementwise.

ZOH (S4D paper, eq. (4); S5 paper, eq. (6)) and bilinear (S4 paper, eq. (3)). A is the diagonal
of the state matrix, so every formula is elementwise and broadcasts between A and dt.
"""
import torch

METHODS = ("zoh", "bilinear")

# Below this |dt*A| the series of (e^z - 1)/z is exact to double precision with 5 terms, and
# it keeps the gradient free of the 1/z^2 cancellation of the closed form.
_SERIES_BELOW = 1e-3


def phi1(z):
    """(e^z - 1) / z, exact for z -> 0 (value 1) and differentiable there.

    Shapes: z any shape, real or complex; result has z's shape and dtype.
    """
    small = z.abs() < _SERIES_BELOW
    z_safe = torch.where(small, torch.ones_like(z), z)  # no 0/0 in the unused branch's gradient
    closed = torch.expm1(z_safe) / z_safe
    series = 1 + z / 2 * (1 + z / 3 * (1 + z / 4 * (1 + z / 5)))  # 1 + z/2 + z^2/6 + z^3/24 + z^4/120
    return torch.where(small, series, closed)


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a discretisation; allowed: {METHODS}")


def discretize(A, dt, method="zoh"):
    """Discretise the diagonal system (A, B) with step dt, so that B_bar = B_scale * B.

        zoh:      A_bar = exp(dt A),                 B_scale = (exp(dt A) - 1) / A = dt * phi1(dt A)
        bilinear: A_bar = (1 + dt A/2)/(1 - dt A/2), B_scale = dt / (1 - dt A/2)

    Shapes:
        A: any shape, complex (or real), the diagonal of the state matrix
        dt: broadcastable with A, real > 0
        returns A_bar, B_scale: the broadcast shape, A's dtype promoted with dt's
    The ZOH form is stable as A -> 0 (B_scale -> dt), with no NaN in values or gradients.
    """
    _check_method(method)
    dtA = dt * A  # (...)
    if method == "zoh":
        return torch.exp(dtA), dt * phi1(dtA)
    denom = 1 - dtA / 2
    return (1 + dtA / 2) / denom, dt / denom


def discretize_ref(A, dt, method="zoh"):
    """Reference twin of `discretize` from the dense 2x2 system of each mode.

    ZOH: expm([[dt A, dt], [0, 0]]) = [[A_bar, B_scale], [0, 1]] (Van Loan), which needs no
    division by A. Bilinear: the matrix form (I - dt/2 M)^{-1} (I + dt/2 M) and (I - dt/2 M)^{-1} dt
    with the 1x1 matrix M = A, solved with torch.linalg.solve.
    """
    _check_method(method)
    A, dt = torch.broadcast_tensors(A, dt * torch.ones_like(A.real))
    cdtype = (A * dt).dtype
    a, d = (A * 1).to(cdtype), dt.to(cdtype)
    if method == "zoh":
        M = torch.zeros(*a.shape, 2, 2, dtype=cdtype)
        M[..., 0, 0], M[..., 0, 1] = d * a, d
        E = torch.linalg.matrix_exp(M)  # (..., 2, 2)
        return E[..., 0, 0], E[..., 0, 1]
    eye = torch.ones_like(a)[..., None, None]
    lhs = eye - (d * a / 2)[..., None, None]
    A_bar = torch.linalg.solve(lhs, eye + (d * a / 2)[..., None, None])[..., 0, 0]
    B_scale = torch.linalg.solve(lhs, d[..., None, None])[..., 0, 0]
    return A_bar, B_scale
