"""The GPU paths: every layer, backend and mode on a CUDA device, in float32 and float64, against
float64 references on the CPU (outputs, final states and the gradients of u and every parameter);
recurrent steps; "auto"'s choices there; the chunked op and the scan; torch.compile; training
(bf16 autocast, exact resume, torchrun); `diagssm bench --device cuda`.

All skipped where torch sees no CUDA device (CI has none). On a GPU machine:
`python -m pytest tests/test_gpu.py` (scripts/gpu-check.sh runs it with the GPU benchmarks).
"""
import copy
import json

import pytest
import torch

from diagssm import bench
from diagssm.layers import DSS, S4, S4D, S5
from diagssm.ops.chunked import diagonal_chunked, diagonal_chunked_ref
from diagssm.ops.scan import scan, scan_ref
from helpers import assert_close, randn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU, F64, C128 = "cuda", torch.float64, torch.complex128
H = 8
LAYERS = {
    "s4d-fft": lambda **kw: S4D(H, 16, backend="fft", **kw),
    "s4d-chunked": lambda **kw: S4D(H, 16, backend="chunked", **kw),
    "s4d-chunked-bilinear-channels": lambda **kw: S4D(H, 16, backend="chunked", discretization="bilinear",
                                                      channels=2, **kw),
    "dss-fft": lambda **kw: DSS(H, 16, backend="fft", **kw),
    "dss-chunked": lambda **kw: DSS(H, 16, backend="chunked", **kw),
    "dss-softmax-fft": lambda **kw: DSS(H, 16, variant="softmax", backend="fft", **kw),
    "s5-scan": lambda **kw: S5(H, 16, **{"mode": "scan", **kw}),
    "s5-conv": lambda **kw: S5(H, 16, mode="conv", **kw),
    "s5-blocks": lambda **kw: S5(H, 16, blocks=2, mode="scan", **kw),
    "s4": lambda **kw: S4(H, 16, **kw),  # "auto": fft on the GPU
    "s4-chunked": lambda **kw: S4(H, 16, backend="chunked", **kw),
}
# float32 on the GPU against float64 on the CPU: the outputs sum up to L = 300 steps, each parameter
# gradient B L = 600 terms (the same widening as the CPU tests of these sums use)
SCALE = {"y": 100, "grad": 300}


def pair(name, dtype, seed=0, **kw):
    """(the layer in float64 on the CPU, a copy of it in `dtype` on the GPU)."""
    torch.manual_seed(seed)
    ref = LAYERS[name](**kw).double()
    return ref, copy.deepcopy(ref).to(GPU, dtype)


def outputs_and_grads(layer, u, w, state):
    """(y, final state or None, gradients of sum(y w) w.r.t. u and every parameter), all on the CPU."""
    u = u.detach().requires_grad_()
    if state is None:
        y, h = layer(u), None
    else:
        y, h = layer(u, state=state, return_state=True)
    grads = torch.autograd.grad((y * w).sum(), [u] + list(layer.parameters()))
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return cpu(y), cpu(h), [cpu(g) for g in grads]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", LAYERS)
def test_layer_on_the_gpu_matches_float64_on_the_cpu(name, dtype, bidirectional):
    ref, gpu = pair(name, dtype, bidirectional=bidirectional)
    L = 300
    u = randn(2, L, H, seed=1)
    w = randn(2, L, ref(u[:, :1]).shape[-1], seed=2)
    state = None if bidirectional else randn(*ref.default_state(2).shape, dtype=C128, seed=3)
    want = outputs_and_grads(ref, u, w, state)
    got = outputs_and_grads(gpu, u.to(GPU, dtype), w.to(GPU, dtype),
                            None if state is None else state.to(GPU, dtype.to_complex()))
    assert got[0].dtype == dtype
    assert_close(got[0], want[0], scale=SCALE["y"])
    if state is not None:
        assert_close(got[1], want[1], scale=SCALE["y"])
    for g, g_ref in zip(got[2], want[2]):
        assert_close(g, g_ref, scale=SCALE["grad"])


@pytest.mark.parametrize("name", ["s4d-chunked", "dss-fft", "s5-scan", "s4"])
def test_steps_on_the_gpu_equal_the_sequence(name):
    _, layer = pair(name, torch.float32)
    u = randn(2, 50, H, seed=4).float().to(GPU)
    state = layer.default_state(2)
    assert state.device.type == "cuda"
    ys = []
    with torch.no_grad():
        for u_t in u.unbind(1):
            y_t, state = layer.step(u_t, state)
            ys.append(y_t)
        y, h = layer(u, return_state=True)
    assert_close(torch.stack(ys, 1).cpu(), y.cpu().double(), scale=SCALE["y"])
    assert_close(state.cpu(), h.cpu().to(C128), scale=SCALE["y"])


def test_auto_picks_the_fft_for_s4d_dss_and_s4_and_the_convolution_for_s5_on_the_gpu():
    u = randn(2, 64, H, seed=5).float().to(GPU)
    for layer in (S4D(H, 16), DSS(H, 16), S4(H, 16)):
        layer.to(GPU)(u)
        assert layer.last_backend == "fft"
    _, s5 = pair("s5-scan", torch.float32, mode="auto")
    y = s5(u)
    assert s5.last_mode == "conv"
    s5.mode = "conv"
    assert torch.equal(y, s5(u))
    s5.mode = "auto"  # a time-varying system needs the scan
    s5(u, dt=torch.ones(2, 64, device=GPU))
    assert s5.last_mode == "scan"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_op_on_the_gpu_matches_the_recurrence(dtype):
    Bsz, L, Hn, M = 3, 200, 4, 6
    u = randn(Bsz, L, Hn, seed=6)
    w = torch.complex(-torch.rand(Hn, M, dtype=F64) * 0.2, torch.randn(Hn, M, dtype=F64))
    B_bar, C = randn(Hn, M, dtype=C128, seed=7), randn(2, Hn, M, dtype=C128, seed=8)
    h0, D = randn(Bsz, Hn, M, dtype=C128, seed=9), randn(2, Hn, seed=10)
    want = diagonal_chunked_ref(u, w, B_bar, C, h0=h0, D=D)
    cdt = dtype.to_complex()
    got = diagonal_chunked(u.to(GPU, dtype), w.to(GPU, cdt), B_bar.to(GPU, cdt), C.to(GPU, cdt),
                           h0=h0.to(GPU, cdt), D=D.to(GPU, dtype), chunk=16, block=3)
    assert_close(got[0].cpu(), want[0], scale=SCALE["y"])
    assert_close(got[1].cpu(), want[1], scale=SCALE["y"])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_scan_on_the_gpu_matches_its_twin(dtype):
    a = (0.9 * torch.rand(2, 500, 6, dtype=F64) + 0.05) * torch.exp(1j * randn(2, 500, 6, seed=11))
    b = randn(2, 500, 6, dtype=C128, seed=12)
    want = scan_ref(a, b)
    assert_close(scan(a.to(GPU, dtype), b.to(GPU, dtype)).cpu(), want, scale=SCALE["y"])


def test_s5_variable_steps_and_resets_on_the_gpu():
    ref, gpu = pair("s5-scan", torch.float32)
    u = randn(2, 120, H, seed=13)
    dt = 0.5 + torch.rand(2, 120, dtype=F64, generator=torch.Generator().manual_seed(14))
    resets = torch.zeros(2, 120, dtype=torch.bool)
    resets[0, 40], resets[1, 77] = True, True
    want = ref(u, dt=dt, resets=resets)
    got = gpu(u.float().to(GPU), dt=dt.float().to(GPU), resets=resets.to(GPU))
    assert_close(got.cpu(), want, scale=SCALE["y"])


@pytest.mark.parametrize("name", ["s4d-chunked", "s4d-fft", "s5-scan"])
def test_torch_compile_on_the_gpu_matches_eager(name):
    _, layer = pair(name, torch.float32)
    u = randn(2, 256, H, seed=15).float().to(GPU)
    compiled = torch.compile(layer)
    with torch.no_grad():
        assert_close(compiled(u).cpu(), layer(u).cpu().double(), scale=SCALE["y"])


@pytest.fixture
def tiny_cuda_config():
    from diagssm.train.config import from_dict
    from test_train_cli import TINY

    return lambda **run: from_dict({**TINY, "model": {**TINY["model"], "dropout": 0.0},
                                    "run": {**TINY["run"], "device": "cuda", "max_steps": 20, **run}})


def test_training_on_the_gpu_resumes_exactly(tmp_path, tiny_cuda_config):
    from diagssm.train.checkpoint import load_checkpoint
    from diagssm.train.loop import Trainer

    cfg = tiny_cuda_config()
    for run in ("straight", "again"):
        assert Trainer(cfg, tmp_path / run).run().status == "completed"
    assert Trainer(cfg, tmp_path / "split").run(stop_after=13).step == 13
    assert Trainer(cfg, tmp_path / "split", resume=True).run().status == "completed"
    a, again, b = (load_checkpoint(tmp_path / d / "checkpoints" / "step_00000020.pt")
                   for d in ("straight", "again", "split"))
    same = lambda x, y: all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])  # noqa: E731
    assert same(a, again), "two uninterrupted runs differ: this GPU's kernels are not deterministic"
    assert same(a, b) and a["val"] == b["val"]


def test_bf16_training_on_the_gpu_is_close_to_fp32(tmp_path, tiny_cuda_config):
    from diagssm.train.loop import Trainer

    fp32 = Trainer(tiny_cuda_config(), tmp_path / "fp32").run()
    bf16 = Trainer(tiny_cuda_config(precision="bf16"), tmp_path / "bf16").run()
    assert bf16.status == "completed"
    assert bf16.val["loss"] == pytest.approx(fp32.val["loss"], abs=0.01)  # as test_train_precision's bound


def test_bench_on_the_gpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--inline", "--device", "cuda", "--layers", "s4d", "s5", "--lengths", "256",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(GPU, float32)" in text and torch.cuda.get_device_name() in text
    saved = json.loads(out.read_text())
    assert saved["device"] == "cuda" and saved["peaks"]["gflops"] > 0 and saved["peaks"]["gbs"] > 0
    ran = [r for r in saved["results"] if "skipped" not in r]
    assert {r["impl"] for r in ran} == {"chunked", "fft", "naive", "scan", "conv"}
    assert all(r["device"] == "cuda" and r["fwdbwd_ms"] > 0 and r["peak_mb"] > 0 for r in ran)


def test_torchrun_on_the_gpu(tmp_path):
    """Two processes with run.device=cuda: rank r takes cuda:r and nccl. On a one-GPU machine the
    second rank has no GPU of its own, which must be a clear error (NCCL cannot share one GPU)."""
    from test_train_cli import write_config
    from test_train_distributed import RUN, assert_same_weights, one_process, two_processes, weights

    cfg = write_config(tmp_path / "t.yaml", run={**RUN, "device": "cuda"}, model={"dropout": 0.0})
    two = two_processes("--config", cfg, "--run-dir", tmp_path / "two")
    if torch.cuda.device_count() < 2:
        assert two.returncode != 0 and "LOCAL_RANK=1 but only 1 CUDA devices exist" in two.stdout + two.stderr
        return
    assert two.returncode == 0, two.stdout + two.stderr
    assert "backend nccl" in two.stdout
    one = one_process("--config", cfg, "--run-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
