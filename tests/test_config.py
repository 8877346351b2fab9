"""The training config: checked YAML sections, dotted --set overrides, the saved round trip."""
from pathlib import Path

import pytest
import yaml

from diagssm.train.config import OptimConfig, TrainConfig, apply_overrides, from_dict, load, save, to_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults():
    cfg = load()
    assert cfg == TrainConfig() and cfg.optim == OptimConfig()
    assert cfg.optim.grad_clip is None and cfg.optim.betas == (0.9, 0.999)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load(path)
    save(cfg, tmp_path / "config.yaml")
    assert load(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(cfg)


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "delay.yaml"}


@pytest.mark.parametrize("data, message", [
    ({"optim": {"lr": 1e-3, "lrr": 1}}, "unknown key 'lrr' in section 'optim'; allowed: lr, ssm_lr,"),
    ({"training": {}}, "unknown section 'training' at the top level; allowed: model, task, optim, run"),
    ({"task": {"name": "recall", "params": {"length": 5}}},
     "unknown key 'length' in section 'task.params' for task 'recall'; allowed: seq_len,"),
    ({"task": {"params": {"seed": 1}}}, "task.params.seed: set the data seed with task.seed"),
    ({"task": {"name": "imdb"}}, "task.name='imdb'; known tasks: adding, assoc_recall, cifar10, copy"),
    ({"run": {"max_steps": "ten"}}, "run.max_steps='ten' has type str; expected int"),
    ({"run": {"max_steps": 10.0}}, "run.max_steps=10.0 has type float; expected int"),
    ({"run": {"progress": "yes please"}}, "run.progress='yes please' has type str; expected bool"),
    ({"model": {"layer_kwargs": [1, 2]}}, "model.layer_kwargs=[1, 2] has type list; expected dict"),
    ({"optim": {"betas": [0.9]}}, "optim.betas=[0.9]: expected a list of 2 (float, float)"),
    ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1]='x' has type str; expected float"),
    ({"optim": {"schedule": "linear"}}, "optim.schedule='linear'; allowed: cosine, constant"),
    ({"optim": {"batch_size": 0}}, "optim.batch_size=0 must be > 0"),
    ({"run": {"threads": 0}}, "run.threads=0 must be >= 1"),
    ({"task": {"seed": 2 ** 32}}, "task.seed=4294967296 must be < 2**32"),
    ({"run": {"seed": 2 ** 32 + 5}}, "run.seed=4294967301 must be < 2**32"),
    ({"optim": {"lr": "inf"}}, "optim.lr=inf must be finite"),
    ({"optim": {"lr": "nan"}}, "optim.lr=nan must be > 0"),
    ({"optim": {"grad_clip": -1}}, "optim.grad_clip=-1.0 must be a finite number > 0 (or null: no clipping)"),
    ({"optim": {"grad_clip": 0}}, "optim.grad_clip=0.0 must be a finite number > 0"),
    ({"optim": {"grad_clip": "nan"}}, "optim.grad_clip=nan must be a finite number > 0"),
    ({"optim": {"min_lr_ratio": 2}}, "optim.min_lr_ratio=2.0 must be in [0, 1]"),
    ({"optim": {"betas": [0.9, 1.5]}}, "optim.betas[1]=1.5 must be in [0, 1)"),
    ({"optim": {"betas": [-0.1, 0.9]}}, "optim.betas[0]=-0.1 must be in [0, 1)"),
    ({"model": "big"}, "section 'model' must be a mapping"),
])
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ValueError) as e:
        from_dict(data)
    assert message in str(e.value)


def test_yaml_file_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="a.yaml: a config must be a mapping of sections; got list"):
        load(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("optim: {lr: 1e-3, wd: 0}\n")
    with pytest.raises(ValueError, match="unknown key 'wd' in section 'optim'"):
        load(tmp_path / "b.yaml")


def test_a_key_given_twice_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys: a second run: section had replaced the first (its
    max_steps, threads and progress) silently."""
    (tmp_path / "c.yaml").write_text("run: {max_steps: 3, threads: 1}\noptim: {lr: 0.01}\nrun: {eval_every: 1}\n")
    with pytest.raises(ValueError, match=r"c.yaml: not valid YAML.*'run' is given twice"):
        load(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("optim: {lr: 0.01, lr: 0.02}\n")
    with pytest.raises(ValueError, match="'lr' is given twice"):
        load(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("task: {params: &p {seq_len: 8}}\nmodel: {layer_kwargs: {<<: *p, seq_len: 4}}\n")
    assert load(tmp_path / "e.yaml").model.layer_kwargs == {"seq_len": 4}  # a merge may repeat a key: allowed
    with pytest.raises(ValueError, match=r"--set 'model.layer_kwargs=\{a: 1, a: 2\}': not valid YAML.*given twice"):
        load(None, ["model.layer_kwargs={a: 1, a: 2}"])
    with pytest.raises(ValueError, match=r"--set 'run.max_steps=\[1': not valid YAML"):  # had been a traceback
        load(None, ["run.max_steps=[1"])
    (tmp_path / "f.yaml").write_text("? [a, b]\n: 1\n")  # the duplicate check had raised TypeError here
    with pytest.raises(ValueError, match="(?s)f.yaml: not valid YAML.*found unhashable key"):
        load(tmp_path / "f.yaml")


def test_dotted_overrides():
    cfg = load(None, ["optim.lr=1e-3", "optim.grad_clip=1", "model.layer_kwargs.d_state=32",
                      "model.layer_kwargs.init=lin", "task.params.seq_len=64", "optim.betas=[0.8, 0.9]",
                      "run.inject_nan_at=null", "model.prenorm=false", "model.pooling=mean"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # PyYAML reads 1e-3 as a string
    assert cfg.optim.grad_clip == 1.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.model.layer_kwargs == {"d_state": 32, "init": "lin"}
    assert cfg.task.params == {"seq_len": 64} and cfg.optim.betas == (0.8, 0.9)
    assert cfg.run.inject_nan_at is None and cfg.model.prenorm is False and cfg.model.pooling == "mean"


def test_overrides_apply_over_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {layer_kwargs: {d_state: 16, init: inv}}\noptim:\n")
    cfg = load(tmp_path / "c.yaml", ["model.layer_kwargs.d_state=8", "optim.lr=0.5"])
    assert cfg.model.layer_kwargs == {"d_state": 8, "init": "inv"} and cfg.optim.lr == 0.5


@pytest.mark.parametrize("item, message", [
    ("optim.lr", "--set 'optim.lr': expected section.key=value"),
    ("lr=1", "--set 'lr=1': expected section.key=value"),
    ("optimiser.lr=1", "--set 'optimiser.lr=1': unknown section 'optimiser'; allowed: model, task, optim, run"),
    ("optim.learning_rate=1", "unknown key 'learning_rate' in section 'optim'"),
    ("optim.lr.warm=1", "optim.lr is a float, not a mapping; it has no key 'warm'"),
    ("run.max_steps=1e3", "run.max_steps='1e3' has type str; expected int"),
    ("run.seed=true", "run.seed=True has type bool; expected int"),
])
def test_bad_overrides(item, message):
    with pytest.raises(ValueError) as e:
        load(None, [item])
    assert message in str(e.value)


def test_apply_overrides_builds_missing_sections():
    data = apply_overrides({"model": None}, ["model.d_model=8", "task.params.delay=3"])
    assert data == {"model": {"d_model": 8}, "task": {"params": {"delay": 3}}}


def test_unquoted_on_off_mean_the_words():
    """YAML 1.1 reads on/off as booleans; run.tensorboard takes the words, so they are given back."""
    assert load(None, ["run.tensorboard=off"]).run.tensorboard == "off"
    assert load(None, ["run.tensorboard=on"]).run.tensorboard == "on"
    with pytest.raises(ValueError, match="run.progress='off' has type str"):
        load(None, ["run.progress='off'"])  # a real bool setting keeps its type check


def test_save_is_atomic(tmp_path, monkeypatch):
    """A resume rewrites config.yaml: a write cut off before its rename leaves the old file whole."""
    from diagssm import files

    path = tmp_path / "config.yaml"
    save(from_dict({"optim": {"lr": 2e-3}}), path)

    def killed(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        save(from_dict({"optim": {"lr": 5e-3}}), path)
    assert load(path).optim.lr == 2e-3
