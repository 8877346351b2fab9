"""`diagssm train`, `eval`, `plot <run-dir>` and `generate` on tiny configs, through main()."""
import argparse
import csv
import importlib.util
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

from diagssm.train import config as config_mod
from diagssm.train.cli import build_parser, main
from diagssm.train.commands import load_run
from diagssm.train.generate import generate

# A recall run that takes about a second: 16 steps per epoch, dropout on (so that RNG state matters).
TINY = {
    "model": {"d_model": 16, "n_layers": 2, "dropout": 0.1, "layer_kwargs": {"d_state": 16}},
    "task": {"name": "recall", "seed": 3, "params": {"seq_len": 32, "n_train": 256, "n_val": 64, "n_test": 96}},
    "optim": {"batch_size": 16, "warmup_steps": 5},
    "run": {"max_steps": 40, "log_every": 5, "eval_every": 10, "checkpoint_every": 10, "keep_last": 2,
            "progress": False, "threads": 1},
}
TINY_DELAY = {
    "model": {"d_model": 8, "n_layers": 1, "layer_kwargs": {"d_state": 16}},
    "task": {"name": "delay", "params": {"seq_len": 64, "delay": 10, "n_train": 64, "n_val": 16, "n_test": 16}},
    "optim": {"batch_size": 16, "warmup_steps": 2},
    "run": {"max_steps": 8, "log_every": 4, "eval_every": 4, "checkpoint_every": 4, "progress": False, "threads": 1},
}


@pytest.fixture(autouse=True)
def keep_threads():
    """run.threads changes torch's global thread count: give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def write_config(path, base=TINY, **sections):
    """Write `base` with sections updated from `sections` ({section: {key: value}}) to `path`."""
    data = {name: dict(values) for name, values in base.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("params", [{}, {"min_len": 20}], ids=["fixed-length", "variable-length"])
def test_dss_softmax_trains_and_evaluates_at_fixed_and_variable_lengths(tmp_path, params):
    """The trainer passes lengths for every batch; on a fixed-length task a DSS-softmax model (L None)
    had refused them (an error meant for padded batches), and on a variable-length one it gets the
    task's longest sequence as L."""
    task = dict(TINY["task"], params=dict(TINY["task"]["params"], **params))
    model = {"layer": "dss", "layer_kwargs": {"d_state": 16, "variant": "softmax"}}
    cfg = write_config(tmp_path / "t.yaml", model=model, task=task,
                       run={"max_steps": 4, "eval_every": 4, "checkpoint_every": 4})
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run)]) == 0
    assert main(["eval", "--run-dir", str(run), "--split", "test"]) == 0
    assert main(["eval", "--run-dir", str(run), "--split", "test", "--rate", "2"]) == 0  # data not resampled


def test_train_writes_the_run_folder_and_eval_reads_it_back(tmp_path, capsys):
    cfg_path, run = write_config(tmp_path / "tiny.yaml"), tmp_path / "run"
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(run), "--set", "optim.lr=2e-3"]) == 0
    saved = config_mod.load(run / "config.yaml")
    assert saved == config_mod.load(cfg_path, ["optim.lr=2e-3"]) and saved.optim.lr == 0.002
    table = rows(run)
    assert [int(r["step"]) for r in table if r["split"] == "train"] == list(range(5, 41, 5))
    assert [int(r["step"]) for r in table if r["split"] == "val"] == [10, 20, 30, 40]
    assert {r["epoch"] for r in table if r["step"] == "40"} == {"2"}  # step 40 is in epoch 40 // 16 = 2
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["best.pt", "step_00000030.pt", "step_00000040.pt"]  # keep_last = 2
    assert (run / "curves.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--split", "val"]) == 0
    out = capsys.readouterr().out
    final_val = float(table[-1]["metric"])
    assert f"accuracy {final_val:.6g} over 64 scored outputs" in out and "step 40" in out
    assert main(["eval", "--run-dir", str(run), "--split", "val", "--checkpoint", "step_00000030.pt"]) == 0
    assert "step 30" in capsys.readouterr().out  # a file name is looked up in the run's checkpoints/
    assert main(["eval", "--run-dir", str(run), "--checkpoint", "step_00000010.pt"]) == 2  # not kept
    assert "no such checkpoint (choose latest, best, a path or a file name in" in capsys.readouterr().err


def test_a_checkpoint_name_is_the_runs_own_file(tmp_path, capsys, monkeypatch):
    """A file of the same name in the current folder had been evaluated instead, and reported as the run's."""
    cfg_path, run = write_config(tmp_path / "t.yaml", run={"max_steps": 20}), tmp_path / "run"
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(run)]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "step_00000010.pt").write_bytes((run / "checkpoints" / "step_00000020.pt").read_bytes())
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--checkpoint", "step_00000010.pt"]) == 0
    assert "step 10" in capsys.readouterr().out
    assert main(["eval", "--run-dir", str(run), "--checkpoint", "./step_00000010.pt"]) == 0  # a path: that file
    assert "step 20" in capsys.readouterr().out


def test_eval_at_another_rate(tmp_path, capsys):
    """--rate r evaluates model(x, lengths, rate=r): every SSM step size scaled by r."""
    from diagssm.train.data import eval_loader
    from diagssm.train.objective import evaluate
    from diagssm.train.world import make_world

    cfg_path, run = write_config(tmp_path / "d.yaml", TINY_DELAY), tmp_path / "run"
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run), "--split", "test", "--rate", "2"]) == 0  # data not resampled
    out = capsys.readouterr().out
    cfg, task, model, _, _ = load_run(run)
    loader = eval_loader(task.test, task, cfg.optim.batch_size)
    at = {r: evaluate(model, loader, task, make_world("cpu"), rate=r)["metric"] for r in (1.0, 2.0)}
    assert abs(at[2.0] - at[1.0]) > 1e-4 * at[1.0]  # the rate changes the outputs
    assert out.startswith(f"test at rate 2: loss {at[2.0]:.6g}, mse {at[2.0]:.6g}")
    for bad in ("0", "inf", "nan"):
        assert main(["eval", "--run-dir", str(run), "--rate", bad]) == 2
        assert f"--rate={float(bad)} is not allowed; expected a positive finite number" in capsys.readouterr().err
    assert main(["eval", "--run-dir", str(run), "--batch-size", "0"]) == 2  # not the run's batch size
    assert "--batch-size=0 must be >= 1" in capsys.readouterr().err
    # --set changes the run's config for the evaluation only (here: a smaller test set)
    assert main(["eval", "--run-dir", str(run), "--set", "task.params.n_test=8"]) == 0
    assert f"over {8 * (64 - 10):,} scored outputs" in capsys.readouterr().out
    assert config_mod.load(run / "config.yaml").task.params["n_test"] == 16


def test_plot_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(write_config(tmp_path / "t.yaml")), "--run-dir", str(run)]) == 0
    (run / "curves.png").unlink()
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 10_000
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0 and (tmp_path / "c.png").exists()
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.csv" in capsys.readouterr().err


def test_plot_figures_of_trained_runs(tmp_path, capsys):
    """kernels, step-sizes and curves of runs in a study layout (label = the model folder)."""
    from diagssm import figures

    runs = []
    for model, seed in (("s4d", 0), ("s4d", 1), ("s5", 0)):
        run = tmp_path / "study" / model / f"seed{seed}"
        cfg = write_config(tmp_path / f"{model}{seed}.yaml", TINY_DELAY, model={"layer": model},
                           run={"seed": seed, "max_steps": 4, "eval_every": 2})
        assert main(["train", "--config", str(cfg), "--run-dir", str(run)]) == 0
        runs.append(str(run))
    for what in ("kernels", "step-sizes", "curves"):
        out = tmp_path / f"{what}.png"
        assert main(["plot", what, *runs, "--out", str(out)]) == 0
        assert out.stat().st_size > 5000
    model = load_run(runs[0], "best")[2]
    expected = [torch.exp(m.log_dt.detach()).double().numpy() for m in model.modules() if hasattr(m, "log_dt")]
    drawn = figures.plot_step_sizes(tmp_path / "again.png", {"s4d": model})["s4d"]
    assert len(drawn) == len(expected) == 1 and (drawn[0] == expected[0]).all()
    capsys.readouterr()
    assert main(["plot", "eigenvalues", "--d-state", "8", "--out", str(tmp_path / "eig.png")]) == 0
    assert (tmp_path / "eig.png").stat().st_size > 5000
    assert main(["plot", "kernels"]) == 2
    assert "takes one or more run folders" in capsys.readouterr().err
    drawn = {}
    real = figures.plot_kernels
    with mock.patch.object(figures, "plot_kernels", lambda *a, **k: drawn.update(real(*a, **k))):
        assert main(["plot", "kernels", runs[0], "--length", "70", "--out", str(tmp_path / "k70.png")]) == 0
    assert drawn["s4d"].shape == (4, 70)  # channels 0-3 of the 8-channel model, 70 lags
    np.testing.assert_array_equal(drawn["s4d"], model.blocks[0].layer.kernel(70)[0, :4].detach().double().numpy())
    assert main(["plot", "kernels", runs[0], "--length", "0", "--out", str(tmp_path / "k0.png")]) == 2
    assert "L=0 must be a positive int" in capsys.readouterr().err


def test_every_option_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) >= {"train", "eval", "generate", "plot", "info"}
    for name, sub in subparsers.choices.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"diagssm {name} {action.option_strings or action.dest} has no help text"


NO_YAML = """
import builtins, sys
real = builtins.__import__
def without_yaml(name, *args, **kwargs):
    if name.split(".")[0] == "yaml":
        raise ModuleNotFoundError("No module named 'yaml'", name="yaml")
    return real(name, *args, **kwargs)
builtins.__import__ = without_yaml
from diagssm.train.cli import main
sys.exit(main(["info"]))
"""


def test_a_missing_extra_is_named(tmp_path):
    """The console script is installed without the [train] extra too: `diagssm info` had ended in a
    ModuleNotFoundError traceback for yaml."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", NO_YAML], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "diagssm: error: this command needs PyYAML (pip install 'diagssm[train]')" in out.stderr


def test_version_names_diagssm_and_torch(capsys):
    import torch

    import diagssm

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"diagssm {diagssm.__version__} (torch {torch.__version__})\n"


def test_train_refuses_a_used_folder_and_resume_needs_a_folder(tmp_path, capsys):
    cfg_path, run = write_config(tmp_path / "t.yaml", run={"max_steps": 2}), tmp_path / "run"
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(run)]) == 2
    assert "is in use" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg_path), "--resume"]) == 2
    assert "--resume needs --run-dir" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg_path), "--set", "optim.lr=fast"]) == 2
    assert "optim.lr='fast' has type str; expected float" in capsys.readouterr().err


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    """Errors of the file system other than a missing or existing file (here NotADirectoryError; a
    read-only disk is the same) had escaped as tracebacks with exit 1, the code of a diverged run."""
    cfg_path = write_config(tmp_path / "t.yaml", run={"max_steps": 2})
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(cfg_path / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diagssm train: error: ") and "Not a directory" in err and "Traceback" not in err


def test_generate_steps_a_delay_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(write_config(tmp_path / "d.yaml", TINY_DELAY)), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    out_csv = tmp_path / "gen.csv"
    assert main(["generate", "--run-dir", str(run), "--prompt-len", "20", "--steps", "30", "--then", "data",
                 "--out", str(out_csv)]) == 0
    out = capsys.readouterr().out
    gap = float(out.split("max |step-by-step output - model(inputs)|: ")[1].split()[0])
    assert gap < 1e-4 and "mse against the targets on scored steps (t >= 10)" in out
    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 50 and list(table[0]) == ["t", "input_0", "output_0"]
    assert b"\r" not in out_csv.read_bytes() and b"\r" not in (run / "metrics.csv").read_bytes()  # \n lines
    assert main(["generate", "--run-dir", str(run), "--prompt-len", "20", "--steps", "-1"]) == 2
    assert "steps=-1 must be >= 0" in capsys.readouterr().err  # it had spoken of then='data' under --then zeros
    _, task, model, _, _ = load_run(run)
    x = task.test[0][0]  # (64, 1)
    assert [float(r["input_0"]) for r in table] == pytest.approx(x[:50, 0].tolist(), rel=1e-5, abs=1e-6)
    assert main(["generate", "--run-dir", str(run), "--prompt-len", "20", "--steps", "30", "--every", "0"]) == 2
    assert "--every=0 must be >= 1" in capsys.readouterr().err


def test_generate_steps_a_token_task(tmp_path, capsys):
    """copy stores its tokens as uint8 (the training batches convert them): generate had refused the
    item, 'x_t must be an int64 (or int32) tensor of tokens'."""
    config = write_config(tmp_path / "c.yaml", TINY_DELAY, task={"name": "copy", "params": {
        "n_copy": 4, "delay": 8, "n_train": 32, "n_val": 16, "n_test": 16}})
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(run), "--prompt-len", "5", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert float(out.split("max |step-by-step output - model(inputs)|: ")[1].split()[0]) < 1e-4


def test_generate_zeros_and_feedback_agree_with_forward(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--config", str(write_config(tmp_path / "d.yaml", TINY_DELAY)), "--run-dir", str(run)]) == 0
    _, task, model, _, _ = load_run(run)
    x = task.test[1][0]  # (64, 1)
    for then in ("zeros", "feedback"):
        inputs, outputs, gap = generate(model, x, prompt_len=16, steps=24, then=then)
        assert inputs.shape == (40, 1) and outputs.shape == (40, 1) and gap < 1e-4
        torch.testing.assert_close(inputs[:16], x[:16])
        expected = torch.zeros(24, 1) if then == "zeros" else outputs[15:39]  # feedback: the previous output
        torch.testing.assert_close(inputs[16:], expected)


def test_generate_rejects_a_pooled_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(write_config(tmp_path / "t.yaml", run={"max_steps": 2})),
                 "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "generate needs a per-step model (pooling 'none'); this run's model has pooling='last'" in err


def test_resume_reports_changed_settings_and_continues(tmp_path, capsys):
    cfg_path, run = write_config(tmp_path / "t.yaml", run={"max_steps": 10}), tmp_path / "run"
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "run.max_steps=20"]) == 0
    out = capsys.readouterr().out
    assert "resuming with a changed setting: run.max_steps: 10 -> 20" in out
    assert "step 20/20: val loss " in out  # run.progress false: a line per validation instead of the bar
    assert f"resumed from {run / 'checkpoints' / 'step_00000010.pt'}: step 10 (epoch 0, batch 10)" in out
    assert config_mod.load(run / "config.yaml").run.max_steps == 20
    assert [int(r["step"]) for r in rows(run) if r["split"] == "val"] == [10, 20]
    # fewer steps than done: an error, config.yaml kept (it had ended at once and saved max_steps 15)
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "run.max_steps=15"]) == 2
    assert "run.max_steps=15 is below the step of step_00000020.pt, 20: nothing to train" in capsys.readouterr().err
    assert config_mod.load(run / "config.yaml").run.max_steps == 20


def test_resume_that_does_not_fit_leaves_the_run_as_it_was(tmp_path, capsys):
    """A --set that changes the model fails the resume (exit 2, one line) and no longer writes itself
    into config.yaml first, which had made every later plain --resume fail too; eval alike."""
    cfg_path, run = write_config(tmp_path / "t.yaml", run={"max_steps": 10}), tmp_path / "run"
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(run)]) == 0
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "model.d_model=8"]) == 2
    err = capsys.readouterr().err
    assert "step_00000010.pt: does not fit the model of this config: size mismatch for" in err
    assert len(err.strip().splitlines()) == 1
    assert (run / "config.yaml").read_text() == before
    assert main(["eval", "--run-dir", str(run), "--set", "model.d_model=8"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model of this config: size mismatch for" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "run.max_steps=20"]) == 0


def test_resume_applies_a_changed_learning_rate(tmp_path, capsys):
    """--resume --set optim.lr=... had been announced and then overwritten by the optimiser's and
    scheduler's saved states: from the resumed step on, the run follows the new rate's schedule,
    as a run started with it does."""
    cfg_path = write_config(tmp_path / "t.yaml", run={"max_steps": 10})
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(run)]) == 0
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "run.max_steps=20",
                 "--set", "optim.lr=0.03", "--set", "optim.weight_decay=0.5"]) == 0
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(ref), "--set", "run.max_steps=20",
                 "--set", "optim.lr=0.03", "--set", "optim.weight_decay=0.5"]) == 0
    lrs = {d: {int(r["step"]): float(r["lr"]) for r in rows(d) if r["split"] == "train"} for d in (run, ref)}
    assert lrs[run][15] == lrs[ref][15] and lrs[run][20] == lrs[ref][20]
    assert lrs[run][5] != lrs[ref][5]  # before the resume: the first rate
    state = torch.load(run / "checkpoints" / "step_00000020.pt", weights_only=False)
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"] if g["name"] == "decay"} == {0.5}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_tensorboard_on_without_tensorboard_is_an_error(tmp_path, capsys):
    cfg_path = write_config(tmp_path / "t.yaml", run={"max_steps": 2, "tensorboard": "on"})
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "run.tensorboard=on but torch.utils.tensorboard does not import" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # checked before anything is written
    cfg_path = write_config(tmp_path / "u.yaml", run={"max_steps": 2})
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(tmp_path / "run2")]) == 0
    assert "TensorBoard: not used (torch.utils.tensorboard does not import" in capsys.readouterr().out


def test_tensorboard_gets_the_rows_when_it_imports(tmp_path, capsys, monkeypatch):
    scalars = []

    class SummaryWriter:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir, purge_step=None):
            self.log_dir = log_dir
            scalars.append(("purge_step", purge_step))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step, value))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    cfg_path, run = write_config(tmp_path / "t.yaml", run={"max_steps": 10, "tensorboard": "on"}), tmp_path / "run"
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(run)]) == 0
    assert f"TensorBoard: logging to {run / 'tensorboard'}" in capsys.readouterr().out
    val = [r for r in rows(run) if r["split"] == "val"][0]
    assert ("val/metric", 10, pytest.approx(float(val["metric"]), rel=1e-5)) in scalars
    assert scalars[0] == ("purge_step", None)
    assert {t for t, *_ in scalars[1:-1]} == {"train/loss", "train/metric", "lr", "val/loss", "val/metric"}
    assert scalars[-1] == "closed"
    # a resume from step 10 purges TensorBoard's events after step 10, as metrics.csv's rows
    scalars.clear()
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "run.max_steps=12"]) == 0
    assert scalars[0] == ("purge_step", 11)


def test_a_model_setting_error_names_its_section(tmp_path, capsys):
    """The model's own checks say "layer='s6' is not allowed"; from the CLI they now say the section,
    as config errors in optim and run do."""
    cfg_path = write_config(tmp_path / "t.yaml")
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(tmp_path / "r"), "--set", "model.layer=s6"]) == 2
    assert "config section 'model': layer='s6' is not allowed; allowed:" in capsys.readouterr().err
