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
