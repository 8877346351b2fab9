"""Every shipped config loads and names valid task parameters; every study file parses."""
import pathlib

import pytest

from diagssm.train import config as config_mod
from diagssm.train.study import Study

ROOT = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(ROOT.glob("*.yaml"))
STUDIES = sorted(p for p in (ROOT / "study").glob("*.yaml") if p.name != "models.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = config_mod.load(path)
    assert cfg.run.max_steps > 0 and cfg.task.name


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_file_parses_with_ten_models(path):
    study = Study(path)
    assert len(study.models) == 10 and len(study.seeds) >= 3
    for model in study.models:
        cfg = study.config(model, seed=study.seeds[0])
        assert cfg.model.layer in ("s4", "s4d", "dss", "s5") and cfg.model.activation == "glu"


def test_every_study_task_is_present():
    names = {Study(p).name for p in STUDIES}
    assert {"listops", "pathfinder32", "sfashion", "ucr", "sc_synthetic", "copy_4096"} <= names


def _write_cifar(folder):
    from test_tasks_images import write_cifar
    return write_cifar(folder, per_batch=4)


def _write_mnist(folder):
    from test_tasks_images import write_idx_folder
    write_idx_folder(folder, n_train=40, n_test=12)
    return folder


def _write_listops(folder):
    from test_tasks_listops import release
    release(folder)
    return folder


def _write_pathfinder(folder):
    from test_tasks_pathfinder import write_release
    folder.mkdir()
    write_release(folder, n=24)
    return folder


def _write_speech(folder):
    from test_tasks_speech import write_folder
    write_folder(folder)
    return folder


@pytest.mark.filterwarnings("ignore:skipped 1 empty image")  # the fixture has one, as the release does
@pytest.mark.parametrize("name,write,extra", [
    ("pathfinder_lra", _write_pathfinder, []),
    ("speech_commands", _write_speech, []),
    ("scifar", _write_cifar, ["task.params.n_val=4"]),
    ("smnist", _write_mnist, ["task.params.n_val=8"]),
    ("listops_lra", _write_listops, []),
])
def test_reader_configs_train_through_the_cli(name, write, extra, tmp_path):
    """The configs of tasks that read users' files train on small files written here."""
    import torch

    from diagssm.train.cli import main

    threads = torch.get_num_threads()
    folder = write(tmp_path / "data")
    sets = [f"task.params.path={folder}", "model.d_model=8", "model.n_layers=1", "optim.batch_size=2",
            "run.max_steps=2", "run.eval_every=2", "run.checkpoint_every=2", "run.progress=false",
            "run.threads=1", "run.tensorboard='off'", *extra]
    args = ["train", "--config", str(ROOT / f"{name}.yaml"), "--run-dir", str(tmp_path / "run")]
    try:
        assert main(args + [arg for s in sets for arg in ("--set", s)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "run" / "checkpoints" / "step_00000002.pt").exists()
