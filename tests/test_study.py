"""`diagssm study`: rows trained, skipped when finished, resumed after a stop, tabulated."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from diagssm.train import study as study_mod
from diagssm.train.cli import main

CONFIG = {
    "model": {"layer": "s4d", "d_model": 8, "n_layers": 1, "layer_kwargs": {"d_state": 8}},
    "task": {"name": "recall", "seed": 0, "params": {"seq_len": 16, "n_train": 64, "n_val": 16, "n_test": 32}},
    "optim": {"batch_size": 16, "warmup_steps": 1},
    "run": {"max_steps": 6, "eval_every": 3, "checkpoint_every": 3, "log_every": 3, "progress": False,
            "threads": 1, "tensorboard": "off"},
}


def write_study(tmp_path, models=None):
    models = models or {"s4d-legs": {"model.layer_kwargs.init": "legs"},
                        "s4d-lin": {"model.layer_kwargs.init": "lin"}}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"study": "tiny", "seeds": [0, 1], "models": "models.yaml", "config": CONFIG}))
    return path


def test_variant_settings_reach_the_config(tmp_path):
    s = study_mod.Study(write_study(tmp_path))
    cfg = s.config("s4d-lin", seed=1)
    assert cfg.model.layer_kwargs == {"d_state": 8, "init": "lin"} and cfg.run.seed == 1
    assert s.config("s4d-legs").model.layer_kwargs["init"] == "legs"
    assert s.select("s4d-lin", "1") == [("s4d-lin", 1)]
    with pytest.raises(ValueError, match="'s9'"):
        s.select("s9")


def test_config_from_a_file_with_common_settings(tmp_path):
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(CONFIG))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"study": "s", "seeds": [2], "config": "train.yaml",
                                    "set": {"model.d_model": 12, "model.layer_kwargs.d_state": 4},
                                    "models": {"a": {"model.layer_kwargs.init": "inv"}}}))
    cfg = study_mod.Study(path).config("a", seed=2)
    assert cfg.model.d_model == 12 and cfg.model.layer_kwargs == {"d_state": 4, "init": "inv"}
    assert cfg.task.params == CONFIG["task"]["params"] and cfg.run.seed == 2


def test_bad_study_files_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"study": "x", "seeds": [0], "models": {"a": {"model.nope": 1}}, "config": CONFIG}))
    with pytest.raises(ValueError, match="nope"):
        study_mod.Study(bad)
    bad.write_text(yaml.safe_dump({"study": "x", "seeds": [], "models": {"a": {}}, "config": CONFIG}))
    with pytest.raises(ValueError, match="seeds"):
        study_mod.Study(bad)
    bad.write_text(yaml.safe_dump({"study": "x", "seeds": [0], "models": {"a": {}}, "config": CONFIG, "extra": 1}))
    with pytest.raises(ValueError, match="extra"):
        study_mod.Study(bad)


def test_malformed_study_files_are_one_line_errors(tmp_path):
    """Each of these had been a traceback (TypeError, AttributeError, yaml's ParserError), was accepted
    (seeds [0, 0], [true]) or failed only after training (an extra test's unknown key)."""
    bad = tmp_path / "bad.yaml"
    ok = {"study": "x", "seeds": [0], "models": {"a": {}}, "config": CONFIG}
    cases = [({"seeds": 3}, "seeds=3 must be a non-empty list of distinct ints"),
             ({"seeds": [0, 0]}, r"seeds=\[0, 0\] must be"), ({"seeds": [True]}, r"seeds=\[True\] must be"),
             ({"set": ["a", "b"]}, "set must be a mapping; got list"),
             ({"extra_tests": ["a"]}, "extra_tests must be a mapping; got list"),
             ({"models": {"a": [1, 2]}}, "models must name a mapping of variants"),
             ({"config": "absent.yaml"}, "absent.yaml: no such config file"),
             ({"extra_tests": {"t": {"set": {"task.params.test_rat": 1}}}},
              r"bad.yaml: model 'a': unknown key 'test_rat' in section 'task.params'")]
    for change, message in cases:
        bad.write_text(yaml.safe_dump({**ok, **change}))
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            study_mod.Study(bad)
    bad.write_text("study: x\nseeds: [0\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        study_mod.Study(bad)


def test_table_counts_the_studys_seeds_and_marks_rows_of_another_config(tmp_path, capsys):
    path, runs = write_study(tmp_path, {"s4d-lin": {"model.layer_kwargs.init": "lin"}}), tmp_path / "runs"
    assert main(["study", "run", str(path), "--runs-dir", str(runs), "--seeds", "0"]) == 0
    row = runs / "tiny" / "s4d-lin"
    for stray in ("seed0.old", "seed7"):  # a backup copy and a seed the study file does not list
        (row / stray).mkdir()
        (row / stray / "result.json").write_text((row / "seed0" / "result.json").read_text().replace(
            '"test": ', '"test": 0.0, "was": '))
    capsys.readouterr()
    assert main(["study", "table", str(path), "--runs-dir", str(runs)]) == 0
    test = json.loads((row / "seed0" / "result.json").read_text())["test"]
    out = capsys.readouterr().out
    assert f"| tiny | s4d-lin | {100 * test:.2f} | 1 |" in out and "‡" not in out
    data = yaml.safe_load(path.read_text())  # the study's training config edited after the row ran
    data["config"]["optim"]["batch_size"] = 8
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "table", str(path), "--runs-dir", str(runs)]) == 0
    assert f"| tiny | s4d-lin‡ | {100 * test:.2f} | 1 |" in capsys.readouterr().out


def test_run_skip_resume_and_table(tmp_path, capsys):
    path, runs = write_study(tmp_path), tmp_path / "runs"
    assert main(["study", "run", str(path), "--runs-dir", str(runs), "--models", "s4d-legs"]) == 0
    for seed in (0, 1):
        result = json.loads((runs / "tiny" / "s4d-legs" / f"seed{seed}" / "result.json").read_text())
        assert result["steps"] == 6 and 0.0 <= result["test"] <= 1.0 and result["params"] > 0
        assert result["seed"] == seed and result["overrides"] == []
        assert result["commit"] is None or len(result["commit"].split("+")[0]) == 40  # None outside git
    capsys.readouterr()
    assert main(["study", "run", str(path), "--runs-dir", str(runs), "--models", "s4d-legs"]) == 0
    out = capsys.readouterr().out
    assert out.count("done before") == 2 and "other settings" not in out
    assert main(["study", "run", str(path), "--runs-dir", str(runs), "--models", "s4d-legs", "--seeds", "0",
                 "--set", "run.max_steps=8"]) == 0
    assert "s4d-legs seed 0: note: it ran with other settings than asked now (run.max_steps: 6, now 8)" in \
        capsys.readouterr().out  # finished rows are kept, but not silently
    row0 = runs / "tiny" / "s4d-legs" / "seed0"
    (row0 / "config.yaml").write_text("model: {no_such_key: 1}\n")  # an older format: still skipped
    assert main(["study", "run", str(path), "--runs-dir", str(runs), "--models", "s4d-legs", "--seeds", "0"]) == 0
    assert "its config.yaml was not compared" in capsys.readouterr().out

    # a row stopped half-way (a checkpoint at step 3, no result) is resumed, not restarted
    s = study_mod.Study(path)
    from diagssm.train.loop import Trainer
    trainer = Trainer(s.config("s4d-lin", 0), s.run_dir(runs, "s4d-lin", 0))
    assert trainer.run(stop_after=3).status == "stopped"
    trainer.close()
    assert main(["study", "run", str(path), "--runs-dir", str(runs), "--models", "s4d-lin", "--seeds", "0"]) == 0
    assert "resuming" in capsys.readouterr().out

    out = tmp_path / "table.md"
    assert main(["study", "table", str(path), "--runs-dir", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    legs = json.loads((runs / "tiny" / "s4d-legs" / "seed0" / "result.json").read_text())
    # seed 0's config.yaml was overwritten above with one that no longer loads: marked ‡ and explained
    assert "| tiny | s4d-legs‡ | " in text and "| 2 |" in text and f"{legs['params']:,}" in text
    assert "‡ its config.yaml differs from the config the study file gives it now" in text
    assert "| tiny | s4d-lin | " in text and "| 1 |" in text
    capsys.readouterr()
    assert main(["study", "table", str(path), "--runs-dir", str(runs), "--per-seed"]) == 0
    per_seed = capsys.readouterr().out
    row = f"| tiny | s4d-legs‡ | 0 | {100 * legs['test']:.2f} | {100 * legs['val']:.2f} | {legs['best_step']} / 6 |"
    assert row in per_seed
    assert per_seed.count("| tiny | s4d-legs") == 2 and per_seed.count("| tiny | s4d-lin |") == 1

    # a row stopped before its first checkpoint (config.yaml and a metrics row, no checkpoint) restarts
    row = s.run_dir(runs, "s4d-lin", 1)
    row.mkdir(parents=True)
    (row / "config.yaml").write_text("stale: true\n")
    (row / "metrics.csv").write_text("step,epoch,split,loss,metric,lr,time\n25,0,train,2.3,0.1,0.001,9.9\n")
    assert main(["study", "run", str(path), "--runs-dir", str(runs), "--models", "s4d-lin", "--seeds", "1"]) == 0
    assert "s4d-lin seed 1: training in" in capsys.readouterr().out and (row / "result.json").exists()
    assert "25,0,train,2.3" not in (row / "metrics.csv").read_text()


def test_list_prints_parameter_counts(tmp_path, capsys):
    assert main(["study", "list", str(write_study(tmp_path))]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "s4d-legs" in out and "parameters" in out and "diagssm study run" in out
    assert "--runs-dir" not in out and "--set" not in out
    assert "warning" not in captured.err  # the same layer with two inits: equal counts
    path = tmp_path / "tiny.yaml"
    assert main(["study", "list", str(path), "--runs-dir", "elsewhere", "--set", "run.max_steps=8"]) == 0
    assert f"diagssm study run {path} --models s4d-legs --runs-dir elsewhere --set run.max_steps=8" in \
        capsys.readouterr().out  # the printed commands are the ones to type (they had dropped both)


def test_list_warns_when_parameter_counts_differ_by_more_than_ten_percent(tmp_path, capsys):
    path = write_study(tmp_path, {"small": {"model.layer_kwargs.d_state": 8},
                                  "large": {"model.layer_kwargs.d_state": 64}})
    assert main(["study", "list", str(path)]) == 0
    captured = capsys.readouterr()
    assert "% above the smallest" in captured.out and "more than the 10%" in captured.err


def test_extra_tests_are_evaluated_and_tabulated(tmp_path, capsys):
    """extra_tests: the best model on the task rebuilt with other settings, at another rate."""
    from diagssm.train.commands import load_run
    from diagssm.train.data import eval_loader
    from diagssm.train.objective import evaluate
    from diagssm.train.world import make_world

    path, runs = tmp_path / "x.yaml", tmp_path / "runs"
    path.write_text(yaml.safe_dump({"study": "x", "seeds": [0], "config": CONFIG,
                                    "models": {"s4d-lin": {"model.layer_kwargs.init": "lin"}},
                                    "extra_tests": {"half": {"rate": 2, "set": {"task.params.n_test": 8}}}}))
    assert main(["study", "run", str(path), "--runs-dir", str(runs)]) == 0
    run = runs / "x" / "s4d-lin" / "seed0"
    got = json.loads((run / "result.json").read_text())["extra_tests"]["half"]
    cfg, task, model, _, _ = load_run(run, "best", overrides=["task.params.n_test=8"])
    expected = evaluate(model, eval_loader(task.test, task, 16), task, make_world("cpu"), rate=2.0)
    assert expected["count"] == 8 and abs(got - expected["metric"]) < 1e-12
    assert main(["study", "table", str(path), "--runs-dir", str(runs)]) == 0
    assert f"| x | s4d-lin, test half | {100 * got:.2f} | 1 |" in capsys.readouterr().out
    result = json.loads((run / "result.json").read_text())  # as if trained with --set: both tables mark it
    (run / "result.json").write_text(json.dumps({**result, "overrides": ["run.max_steps=2"]}))
    from diagssm.train import config as config_mod
    config_mod.save(study_mod.Study(path).config("s4d-lin", 0, ["run.max_steps=2"]), run / "config.yaml")
    for extra in ([], ["--per-seed"]):
        assert main(["study", "table", str(path), "--runs-dir", str(runs), *extra]) == 0
        out = capsys.readouterr().out
        assert "| x | s4d-lin* | " in out and "\\* trained with --set overrides" in out  # and says what * is
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"study": "x", "seeds": [0], "config": CONFIG, "models": {"a": {}},
                                   "extra_tests": {"t": {"rate": 0}}}))
    with pytest.raises(ValueError, match="extra_tests.t"):
        study_mod.Study(bad)


def test_a_failing_row_does_not_stop_the_others(tmp_path, capsys):
    """A row that diverges (learning rate 1e30) is reported; the rows after it still train."""
    path = write_study(tmp_path, {"diverges": {"optim.lr": 1e30, "optim.ssm_lr": 1e30},
                                  "s4d-legs": {"model.layer_kwargs.init": "legs"}})
    runs = tmp_path / "runs"
    assert main(["study", "run", str(path), "--runs-dir", str(runs), "--seeds", "0"]) == 1
    err = capsys.readouterr().err
    assert "diverges seed 0: failed:" in err and "1 of 2 rows failed: diverges seed 0" in err
    assert (runs / "tiny" / "s4d-legs" / "seed0" / "result.json").exists()
    assert not (runs / "tiny" / "diverges" / "seed0" / "result.json").exists()


def test_a_row_whose_folder_cannot_be_written_does_not_stop_the_others(tmp_path, capsys):
    """A file system error in one row (its folder's place taken by a file) had ended the whole study
    with a traceback; it is that row's failure."""
    path = write_study(tmp_path)
    runs = tmp_path / "runs"
    (runs / "tiny" / "s4d-legs").mkdir(parents=True)
    (runs / "tiny" / "s4d-legs" / "seed0").write_text("not a folder")
    assert main(["study", "run", str(path), "--runs-dir", str(runs), "--seeds", "0"]) == 1
    err = capsys.readouterr().err
    assert "s4d-legs seed 0: failed:" in err and "1 of 2 rows failed: s4d-legs seed 0" in err
    assert (runs / "tiny" / "s4d-lin" / "seed0" / "result.json").exists()


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).parents[1] / "configs" / "study").glob("*.yaml")
                                        if p.name != "models.yaml"), ids=lambda p: p.stem)
def test_committed_studies_keep_parameter_counts_within_ten_percent(path):
    """Issue #8: the models of a study have parameter counts within 10% of each other. The task's
    data is not built here: a stand-in with the task's encoder and sizes is enough, since only the
    SSM layers differ between a study's models."""
    from diagssm.train.setup import make_model

    study = study_mod.Study(path)
    counts = {}
    for model in study.models:
        cfg = study.config(model)
        task = SimpleNamespace(name=cfg.task.name, d_input=3, d_output=10, encoder="linear", pooling="mean",
                               head="classification", max_length=None)
        counts[model] = sum(p.numel() for p in make_model(cfg.model, task).parameters())
    assert study_mod.parameter_spread(counts) <= 10, f"{path.name}: {counts}"


def test_code_commit_is_this_repositorys_or_none(tmp_path):
    """An installed copy inside another git repository (a venv in a project) must not report that
    repository's commit."""
    import importlib.util
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "another project"], check=True)  # a HEAD to report
    copy = tmp_path / "study.py"
    shutil.copy(study_mod.__file__, copy)
    spec = importlib.util.spec_from_file_location("study_copy", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.code_commit() is None
    ours = study_mod.code_commit()
    assert ours is None or len(ours.split("+")[0]) == 40
