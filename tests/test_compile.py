"""torch.compile of the layers: the native ops (ctypes calls on raw pointers, which dynamo cannot
trace) must run as they do eagerly, so a compiled layer gives the float64 layer's outputs, gradients
and steps. Backends "eager" (dynamo's graphs run as they are) and "aot_eager" (through AOT autograd
and fake tensors); inductor's code generation adds nothing the native calls depend on."""
import pytest
import torch

from diagssm import ops
from diagssm.layers import DSS, S4, S4D, S5
from diagssm.ops import chunked_native
from helpers import assert_close, randn

needs_native = pytest.mark.skipif(not chunked_native.available(),
                                  reason=f"native kernels unavailable: {chunked_native.why_unavailable()}")
LAYERS = {  # (H, N) not multiples of 16 too: the padded lanes
    "s4d": lambda: S4D(32, 16), "s4d-H40": lambda: S4D(40, 16), "dss": lambda: DSS(32, 16),
    "s5": lambda: S5(32, 16), "s5-H40-N28": lambda: S5(40, 28),
    "s5-bidirectional": lambda: S5(32, 16, bidirectional=True),
    "s4": lambda: S4(32, 16), "s4-fft": lambda: S4(32, 16, backend="fft"),  # S4: "auto" is chunked on the CPU
}


def fwd_bwd(layer, u, gy):
    u = u.clone().requires_grad_()
    y = layer(u)
    return [y] + list(torch.autograd.grad((y * gy).sum(), [u] + list(layer.parameters())))


@needs_native
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_layer_matches_float64(name, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LAYERS[name]()
    H = layer.d_model
    u, gy = randn(2, 200, H, seed=1), randn(2, 200, H, seed=2)
    want = fwd_bwd(layer.double(), u, gy)
    layer.float()
    got = fwd_bwd(torch.compile(layer, backend=backend), u.float(), gy.float())
    for g, w in zip(got, want):  # sums over up to B L steps
        assert_close(g, w, scale=30)  # the worst measured: 3.1


@needs_native
@pytest.mark.parametrize("name", ["s4d", "s5", "s4"])
def test_compiled_step_matches_float64(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LAYERS[name]()
    u = randn(3, 20, layer.d_model, seed=3)
    with torch.no_grad():
        want, state = [], layer.double().default_state(3)
        for u_t in u.unbind(1):
            y, state = layer.step(u_t, state)
            want.append(y)
        layer.float()
        step = torch.compile(layer.step, backend="eager")
        state = layer.default_state(3)
        for k, u_t in enumerate(u.float().unbind(1)):
            y, state = step(u_t, state)
            assert_close(y, want[k], scale=100)


def _op_cases():
    """(op, float64 twin, float64 arguments) of every op with a native kernel; the first argument is
    real, the rest as the op takes them (built from layers where the system has structure)."""
    H, M, B, L = 32, 4, 2, 70
    w = torch.complex(-torch.rand(H, M, dtype=torch.float64) * 0.3 - 0.01, torch.randn(H, M, dtype=torch.float64))
    Bb, C, D = randn(H, M, dtype=torch.complex128, seed=4), randn(1, H, M, dtype=torch.complex128, seed=5), randn(1, H)
    u, h0, u_t = randn(B, L, H, seed=6), randn(B, H, M, dtype=torch.complex128, seed=7), randn(B, H, seed=8)
    a = torch.polar(0.5 + 0.4 * torch.rand(M, dtype=torch.float64), torch.rand(M, dtype=torch.float64))
    s5 = S5(H, 16).double()  # 8 modes: 2 x modes on 16 lanes
    A_bar, W_in, W_out = s5.step_system(1.0)
    h5 = randn(B, 8, dtype=torch.complex128, seed=10)
    s4 = S4(H, 2 * M).double()
    return {
        "diagonal_chunked": (ops.diagonal_chunked, ops.diagonal_chunked_ref, (u, w, Bb, C, 2, h0, None, D)),
        "s5_fused": (ops.s5_fused, ops.s5_fused_ref, (u, W_in, A_bar, W_out, s5.D, h5)),
        "scan": (ops.scan, ops.scan_ref, (a, randn(B, L, M, dtype=torch.complex128, seed=9))),
        "diagonal_step": (ops.diagonal_step, ops.diagonal_step_ref, (u_t, h0, torch.exp(w), Bb, C, D, 2)),
        "s5_step": (ops.s5_step, ops.s5_step_ref, (u_t, h5, A_bar, W_in, W_out, s5.D)),
        "dplr_step": (ops.dplr_step, ops.dplr_step_ref, (u_t, h0, *s4.step_system(1.0), s4.D)),
    }


def lower(x):
    if not torch.is_tensor(x):
        return x
    return x.detach().to(torch.complex64 if x.is_complex() else torch.float32)


@needs_native
@pytest.mark.parametrize("name", list(_op_cases()))
def test_compiled_ops_run_their_kernels(name):
    """Each op called from compiled code (backend "eager": the graph dynamo captured runs as it is):
    its outputs, and for the differentiable ones the gradient of its first argument, as its float64
    twin's. Traced instead of run, the kernels would leave their outputs unwritten."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    op, ref, args = _op_cases()[name]
    grad = name in ("diagonal_chunked", "s5_fused", "scan")
    leaf64, leaf32 = args[0].clone().requires_grad_(grad), lower(args[0]).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        want = ref(leaf64, *args[1:])
        got = torch.compile(op, backend="eager")(leaf32, *map(lower, args[1:]))
    got, want = (got,) if torch.is_tensor(got) else got, (want,) if torch.is_tensor(want) else want
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close(g, w, scale=100)
    if grad:  # <y, y> as the loss: a gradient that depends on every output
        (g32,) = torch.autograd.grad(got[0].abs().pow(2).sum(), [leaf32])
        (g64,) = torch.autograd.grad(want[0].abs().pow(2).sum(), [leaf64])
        assert_close(g32, g64, scale=30)  # the worst measured: 3.4


@needs_native
@pytest.mark.parametrize("layer", ["s5", "s4d"])
def test_compiled_model_matches_float64(layer):
    """A whole model (encoder, blocks, pooling, head) compiled through AOT autograd: the blocks' other
    modules compile around the SSM layers; outputs and every parameter's gradient as in float64."""
    from diagssm.models import SequenceModel
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SequenceModel(3, 5, d_model=32, n_layers=2, layer=layer, layer_kwargs=dict(d_state=16))
    x = randn(2, 150, 3, seed=11)
    model.double()
    y64 = model(x)
    g64 = torch.autograd.grad(y64.pow(2).sum(), list(model.parameters()))
    model.float()
    y32 = torch.compile(model, backend="aot_eager")(x.float())
    g32 = torch.autograd.grad(y32.pow(2).sum(), list(model.parameters()))
    assert_close(y32, y64, scale=100)
    for a, b in zip(g32, g64):
        assert_close(a, b, scale=100)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", ["fft_conv", "s4", "s4-fft"])
def test_jit_trace_at_the_traced_length(name):
    """torch.jit.trace (deprecated in torch, still used for export): a trace at one length gives the
    float64 results on new inputs of that length. Traced, a size is a tensor, and the FFT length's
    search (`conv._fast_len`) changed it in place: a wrong FFT length, outputs off by up to 42."""
    torch.manual_seed(0)
    u, u2 = randn(2, 128, 32, seed=12), randn(2, 128, 32, seed=13)
    if name == "fft_conv":
        K, D = randn(32, 128, seed=14), randn(32, seed=15)
        module, want = torch.nn.Module(), lambda x: ops.fft_conv_ref(x, K, D)
        module.forward = lambda x: ops.fft_conv(x, K, D)
    else:
        module = LAYERS[name]().double()
        want = module
    traced = torch.jit.trace(module, u, check_trace=False)
    assert_close(traced(u2), want(u2))
