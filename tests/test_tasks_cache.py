"""The task cache (atomic, keyed by name, params and version) and `diagssm data list/build/show`."""
import os

import pytest
import torch

from diagssm.tasks import cache, registry
from diagssm.train.cli import main


def _build_counter(calls, value):
    def build():
        calls.append(1)
        return {"x": torch.arange(5) * value, "n": value}
    return build


def test_cached_builds_once_and_reads_back():
    calls = []
    a = cache.cached("demo", {"n": 3, "seed": 1}, _build_counter(calls, 3), version=1)
    b = cache.cached("demo", {"seed": 1, "n": 3}, _build_counter(calls, 99), version=1)  # key order ignored
    assert len(calls) == 1
    assert torch.equal(a["x"], b["x"]) and b["n"] == 3


def test_cached_key_depends_on_params_and_version():
    calls = []
    cache.cached("demo", {"n": 3}, _build_counter(calls, 3), version=1)
    cache.cached("demo", {"n": 4}, _build_counter(calls, 4), version=1)
    out = cache.cached("demo", {"n": 3}, _build_counter(calls, 7), version=2)
    assert len(calls) == 3 and out["n"] == 7
    assert len(list(cache.cache_dir().glob("demo-v*.pt"))) == 3


def test_force_rebuild_overwrites():
    calls = []
    cache.cached("demo", {"n": 3}, _build_counter(calls, 3), version=1)
    cache.force_rebuild(True)
    try:
        out = cache.cached("demo", {"n": 3}, _build_counter(calls, 5), version=1)
    finally:
        cache.force_rebuild(False)
    assert out["n"] == 5 and cache.cached("demo", {"n": 3}, _build_counter(calls, 9), version=1)["n"] == 5


def test_truncated_cache_is_an_error_naming_the_file():
    cache.cached("demo", {"n": 3}, _build_counter([], 3), version=1)
    (path,) = cache.cache_dir().glob("demo-v1-*.pt")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(cache.DataError, match=str(path)):
        cache.cached("demo", {"n": 3}, _build_counter([], 3), version=1)


def test_a_failed_build_leaves_no_cache_file():
    def build():
        raise RuntimeError("interrupted half-way")
    with pytest.raises(RuntimeError, match="interrupted half-way"):
        cache.cached("demo", {"n": 1}, build, version=1)
    assert not cache.cache_dir().exists() or not any(cache.cache_dir().iterdir())


def test_write_failure_leaves_no_partial_file(monkeypatch):
    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cache.cached("demo", {"n": 2}, _build_counter([], 2), version=1)
    assert [p.name for p in cache.cache_dir().iterdir()] == []


def test_file_stamp_names_a_missing_file(tmp_path):
    with pytest.raises(cache.DataError, match="nothing-here"):
        cache.file_stamp(tmp_path / "nothing-here")
    f = tmp_path / "a.txt"
    f.write_text("abc")
    assert cache.file_stamp(f)["size"] == 3


def _square(v):
    return v * v


def test_parallel_map_keeps_order():
    assert cache.parallel_map(_square, range(7), workers=2) == [v * v for v in range(7)]
    assert cache.parallel_map(_square, range(3), workers=1) == [0, 1, 4]
    with pytest.raises(ValueError, match="workers"):
        cache.parallel_map(_square, range(3), workers=0)


def test_parallel_map_from_a_script_without_a_main_guard_says_why_it_failed(tmp_path):
    """'spawn' re-imports the main script in every worker: unguarded, the script's build starts again
    there and the pool breaks. The error must say so, not only BrokenProcessPool."""
    import subprocess
    import sys

    script = tmp_path / "build.py"
    script.write_text("import math\nfrom diagssm.tasks.cache import parallel_map\n"
                      "print(parallel_map(math.sqrt, [1.0, 4.0, 9.0], workers=2))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "RuntimeError: a worker process of a data build died" in out.stderr
    assert "if __name__ == '__main__':" in out.stderr


def test_every_task_has_a_source_and_a_card():
    root = os.path.join(os.path.dirname(__file__), "..")
    assert set(registry.TASKS) == set(registry.SOURCES)
    for name, source in registry.SOURCES.items():
        assert os.path.exists(os.path.join(root, source.card)), f"task {name}: missing data card {source.card}"


def test_data_list_shows_every_task(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in registry.TASKS:
        assert f"\n{name} " in out


def test_data_build_caches_and_show_saves_a_picture(tmp_path, capsys):
    args = ["--param", "seq_len=32", "--param", "n_train=40", "--param", "n_val=8", "--param", "n_test=8"]
    assert main(["data", "build", "recall", *args, "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "train      40 sequences, length 32..32" in out and "recall: built in" in out
    assert len(list(cache.cache_dir().glob("recall-v1-*.pt"))) == 1
    assert main(["data", "build", "recall", *args, "--seed", "3"]) == 0  # a cache hit says so (it said "built")
    assert "recall: read from the cache in" in capsys.readouterr().out
    png = tmp_path / "recall.png"
    assert main(["data", "show", "recall", *args, "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert "example 0: length 32" in capsys.readouterr().out


def test_data_build_rejects_unknown_params(capsys):
    assert main(["data", "build", "recall", "--param", "seq_len=-4"]) == 2
    assert "seq_len=-4" in capsys.readouterr().err
    assert main(["data", "build", "recall", "--param", "colour=3"]) == 2
    assert "unknown key 'colour' in --param for task 'recall'" in capsys.readouterr().err
    assert main(["data", "build", "recall", "--param", "seq_len=[4"]) == 2  # had been a traceback
    assert "--param 'seq_len=[4': not valid YAML" in capsys.readouterr().err


def test_data_build_takes_the_task_section_of_a_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: {name: recall, seed: 2, params: {seq_len: 24, n_train: 30, n_val: 6, n_test: 6}}\n")
    assert main(["data", "build", "recall", "--config", str(cfg), "--param", "n_train=12"]) == 0
    assert "train      12 sequences, length 24..24" in capsys.readouterr().out
    assert main(["data", "build", "delay", "--config", str(cfg)]) == 2
    assert "is for task 'recall', not 'delay'" in capsys.readouterr().err
