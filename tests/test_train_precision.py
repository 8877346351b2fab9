"""run.precision=bf16 (autocast, SSM layers in float32) and run.compile (torch.compile) on CPU."""
import time

import pytest
import torch

from diagssm.layers.base import SSMLayer
from diagssm.train.config import from_dict
from diagssm.train.loop import Trainer
from diagssm.train.metrics import read_rows
from diagssm.train.setup import make_model, make_task
from diagssm.train.world import keep_ssm_float32, make_world
from helpers import assert_close
from test_train_cli import TINY, TINY_DELAY, keep_threads  # noqa: F401  (keep_threads: an autouse fixture)

STEPS = 12
RUN = {**TINY["run"], "max_steps": STEPS, "log_every": 4, "eval_every": 12, "checkpoint_every": 12}
# bf16 rounds the linear maps' inputs to 8 bits of mantissa (relative 2^-9 = 0.002): after 12
# steps the final train losses differ by 4e-4 (measured: 2.39049 fp32, 2.39091 bf16); 0.01 allows for 25x.
LOSS_ATOL = 0.01


def config(**run):
    return from_dict({**TINY, "model": {**TINY["model"], "dropout": 0.0}, "run": {**RUN, **run}})


def train_losses(run_dir):
    return [r["loss"] for r in read_rows(run_dir / "metrics.csv") if r["split"] == "train"]


def test_keep_ssm_float32_under_autocast(monkeypatch):
    cfg = config()
    task = make_task(cfg)
    model = make_model(cfg.model, task)
    keys = list(model.state_dict())
    inside, seen = [], []

    def spy(forward):  # the class's forward, which runs inside the float32 region
        def run(self, u, *args, **kwargs):
            inside.append((u.dtype, torch.is_autocast_enabled("cpu")))
            return forward(self, u, *args, **kwargs)
        return run

    for cls in {type(m) for m in model.modules() if isinstance(m, SSMLayer)}:
        monkeypatch.setattr(cls, "forward", spy(cls.forward))
    for m in model.modules():
        if isinstance(m, SSMLayer):
            m.register_forward_hook(lambda mod, inp, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    assert keep_ssm_float32(model) == cfg.model.n_layers and keep_ssm_float32(model) == 0  # idempotent
    assert list(model.state_dict()) == keys  # names unchanged: checkpoints load either way
    x, _, lengths = task.collate([task.train[i] for i in range(4)])
    with make_world("cpu", "bf16").autocast():
        out = model(x, lengths)
        linear = model.blocks[0].out(torch.randn(2, cfg.model.d_model))
    assert linear.dtype == torch.bfloat16  # autocast is on around the model ...
    assert inside == [(torch.float32, False)] * cfg.model.n_layers  # ... off inside the SSM layers, input float32
    assert seen == [(True, torch.float32)] * cfg.model.n_layers  # their outputs float32 amid autocast
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bf16_run_is_close_to_fp32(tmp_path, capsys):
    ref = Trainer(config(), tmp_path / "fp32").run()
    trainer = Trainer(config(precision="bf16"), tmp_path / "bf16")
    dtypes = set()
    for m in trainer.model.modules():
        if isinstance(m, SSMLayer):
            m.register_forward_hook(lambda mod, inp, out: dtypes.add((torch.is_autocast_enabled("cpu"), out.dtype)))
    out = trainer.run()
    assert out.status == "completed" and "precision: bf16 autocast, SSM layers in float32" in capsys.readouterr().out
    assert dtypes == {(True, torch.float32)}  # float32 SSM outputs while autocast is on around them
    fp32, bf16 = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(bf16)))
    print(f"final train loss: fp32 {fp32[-1]:.5f}, bf16 {bf16[-1]:.5f}")
    assert bf16[-1] == pytest.approx(fp32[-1], abs=LOSS_ATOL)
    assert out.val["loss"] == pytest.approx(ref.val["loss"], abs=LOSS_ATOL)


def test_eval_uses_the_runs_precision(tmp_path, capsys):
    """`diagssm eval` of a bf16 run's checkpoint gives the val numbers the run logged (fp32 does not:
    the delay task's mse differs in the 4th digit)."""
    from diagssm.train.cli import main

    run = tmp_path / "bf16"
    cfg = from_dict({**TINY_DELAY, "run": {**TINY_DELAY["run"], "precision": "bf16"}})
    out = Trainer(cfg, run).run()
    for precision in ("bf16", "fp32"):
        capsys.readouterr()
        assert main(["eval", "--run-dir", str(run), "--split", "val", "--set", f"run.precision={precision}"]) == 0
        text = capsys.readouterr().out
        assert ("precision: bf16 autocast" in text) == (precision == "bf16")
        loss = float(text.split("val: loss ")[1].split(",")[0])
        if precision == "bf16":
            assert loss == pytest.approx(out.val["loss"], rel=1e-5)  # printed to 6 digits
        else:
            assert loss != pytest.approx(out.val["loss"], rel=1e-4)  # what eval had given


def test_compile_run_matches_eager(tmp_path, capsys):
    start = time.perf_counter()
    eager = Trainer(config(max_steps=4), tmp_path / "eager").run()
    out = Trainer(config(max_steps=4, compile=True), tmp_path / "compiled").run()
    print(f"compiled run: {time.perf_counter() - start:.1f} s")
    assert out.status == "completed" and "torch.compile: on (run.compile=true)" in capsys.readouterr().out
    assert out.val["loss"] == pytest.approx(eager.val["loss"], rel=1e-3)


@pytest.mark.parametrize("run, message", [
    ({"precision": "fp16"}, "run.precision='fp16'; allowed: fp32, bf16"),
    ({"compile": "yes"}, "run.compile='yes' has type str; expected bool"),
])
def test_config_checks(run, message):
    with pytest.raises(ValueError, match=message):
        from_dict({"run": run})


def test_compile_failure_is_an_error_naming_it(tmp_path):
    """No silent fallback: without a working C++ compiler, inductor's error ends the run (exit 2)."""
    import os
    import subprocess
    import sys

    from test_train_cli import write_config

    cfg = write_config(tmp_path / "t.yaml", run={**RUN, "max_steps": 2, "compile": True})
    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "diagssm", "train", "--config", str(cfg), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "diagssm train: error: run.compile=true: torch.compile failed (torch._inductor" in done.stderr
    assert "set run.compile=false" in done.stderr


def test_keep_ssm_float32_survives_copies_and_steps():
    """A deepcopy (EMA, AveragedModel) runs its own parameters, a pickled layer keeps float32 under
    autocast, and `step` runs in float32 too (before session 26 the copy ran the original's forward,
    pickling failed, and stepping under autocast raised)."""
    import copy
    import io

    from diagssm.layers import S4D
    torch.manual_seed(0)
    layer = S4D(8, d_state=16)
    keep_ssm_float32(layer)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.C.mul_(-2.0)
    u = torch.randn(2, 20, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_twin = layer(u.bfloat16()), twin(u.bfloat16())
        y_t, _ = layer.step(u[:, 0].bfloat16(), layer.default_state(2))
    plain = S4D(8, d_state=16)
    plain.load_state_dict(layer.state_dict())
    assert y.dtype == torch.float32 and y_t.dtype == torch.float32
    assert_close(y, plain(u.bfloat16().float()))
    assert_close(y_t, plain.step(u[:, 0].bfloat16().float(), plain.default_state(2))[0])
    plain.load_state_dict(twin.state_dict())
    assert_close(y_twin, plain(u.bfloat16().float()))  # the copy's own (changed) C
    buf = io.BytesIO()
    torch.save(twin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close(loaded(u.bfloat16()), y_twin)
    assert keep_ssm_float32(loaded) == 0  # still installed


AUTOCAST_CASES = [  # (layer, options, H): each path a layer can take on the CPU, native and not
    ("S4D", {}, 16), ("S4D", {}, 8), ("S4D", {"backend": "fft"}, 16), ("DSS", {}, 16),
    ("DSS", {"variant": "softmax"}, 8), ("S5", {}, 16), ("S5", {}, 8), ("S5", {"mode": "conv"}, 16),
    ("S4", {}, 16), ("S4", {}, 8), ("S4", {"backend": "fft"}, 16),
]


@pytest.mark.parametrize("name,options,H", AUTOCAST_CASES)
def test_layers_compute_in_float32_under_autocast(name, options, H):
    """Without keep_ssm_float32, a layer under bf16 autocast gives what it gives without autocast
    (float32 outputs, states and steps, and the gradients of a forward run under autocast), on every
    path. Before, its matmuls ran in bfloat16 inside: S4's native path read bfloat16 tensors as
    float32 (NaN or wrong outputs, then heap corruption in the backward), others returned bfloat16
    or raised."""
    from diagssm import layers
    torch.manual_seed(0)
    layer = getattr(layers, name)(H, d_state=16, **options)
    u = torch.randn(2, 70, H, requires_grad=True)
    state = torch.randn_like(layer.default_state(2))
    leaves = [u] + list(layer.parameters())

    def forward():
        y, h = layer(u, state=state, return_state=True)
        y_t, h_t = layer.step(u[:, 0], state, **({"L": 70} if getattr(layer, "length_dependent", False) else {}))
        return (y * torch.linspace(-1, 1, H)).sum(), [y, h, y_t, h_t]

    loss, want = forward()
    want += torch.autograd.grad(loss, leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, got = forward()
        y_half = layer(u.detach().bfloat16())  # an autocast op's output before the layer
        loss_in, _ = forward()
        inside = torch.autograd.grad(loss_in, leaves)  # a backward inside autocast (PyTorch advises against)
    got += torch.autograd.grad(loss, leaves)  # the backward outside, as PyTorch advises
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert_close(g, w)
    assert y_half.dtype == torch.float32
    assert_close(y_half, layer(u.detach().bfloat16().float()))
    # Inside autocast PyTorch runs the built-in ops' backwards in bfloat16 (the library's own ops stay
    # float32, and S4's native path had corrupted the heap here): bfloat16-close, relative to each
    # gradient's largest entry.
    for g, w in zip(inside, want[4:]):
        m = w.abs().max()
        assert g.dtype == torch.float32
        assert_close(g / m, w / m, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["S4D", "S4", "S5"])
def test_autocast_wrapper_keeps_the_calling_conventions(name):
    """The wrapper had taken the input as a parameter named u: step(u_t=...) failed on every layer
    ("missing 1 required positional argument: 'u'"). A float64 layer takes a half input as float64
    (it had been cast to float32 and refused as not the layer's dtype)."""
    from diagssm import layers
    torch.manual_seed(0)
    layer = getattr(layers, name)(16, d_state=8)
    u, state = torch.randn(2, 5, 16), layer.default_state(2)
    want_y, want_t = layer(u), layer.step(u[:, 0], state)[0]
    assert_close(layer(u=u), want_y)
    assert_close(layer.step(u_t=u[:, 0], state=state)[0], want_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close(layer(u=u), want_y)
        assert_close(layer.step(u_t=u[:, 0], state=state)[0], want_t)
        y64 = layer.double()(u.bfloat16())
    assert y64.dtype == torch.float64
    assert_close(y64, layer(u.bfloat16().double()))
