"""Memory tasks: each target checked by an independent scan of the input, marker placement,
seeds, parameter validation, the cache, long sequences, scoring and `show`."""
import time
from pathlib import Path

import pytest
import torch

from diagssm.tasks import memory
from diagssm.tasks.memory_show import token_runs
from diagssm.tasks.registry import SOURCES, TASKS, build_task
from diagssm.train.objective import batch_stats

SMALL = dict(n_train=64, n_val=16, n_test=32)
MEMORY = ("copy", "delayed_copy", "selective_copy", "assoc_recall", "induction_heads", "adding")
EXAMPLE = {  # small parameters of each task
    "copy": dict(delay=30, n_copy=6, n_symbols=8),
    "delayed_copy": dict(seq_len=50, delay=9, n_symbols=5),
    "selective_copy": dict(seq_len=60, n_copy=7, n_symbols=6),
    "assoc_recall": dict(seq_len=40, n_keys=6, n_values=5),
    "induction_heads": dict(seq_len=30, n_symbols=6),
    "adding": dict(seq_len=40),
}


def build(name, **kw):
    return build_task(name, **{**EXAMPLE[name], **SMALL, **kw})


def xs_ys(dataset):
    """Every item of `dataset`, stacked: x (n, L...) and y (n, ...)."""
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1]) for it in items])


def test_registered_with_generated_sources_and_the_card():
    card = Path(__file__).parents[1] / "docs/data/memory.md"
    for name in MEMORY:
        assert name in TASKS and SOURCES[name].kind == "generated"
        assert SOURCES[name].card == "docs/data/memory.md" and SOURCES[name].available() is None
    assert card.exists() and all(f"`{name}`" in card.read_text() for name in MEMORY + ("recall", "delay"))


def test_copy_answers_are_the_first_symbols():
    task = build("copy", seed=3)
    assert task.train.x.dtype == task.train.y.dtype == torch.uint8  # stored compactly
    x, y = task.train.x.long(), task.train.y.long()  # (64, 42)
    delay, n = 30, 6
    assert x.shape == y.shape == (64, delay + 2 * n)
    assert (task.d_input, task.d_output, task.score_start, task.head, task.pooling) == (10, 9, 36, "per_step", "none")
    assert ((x[:, :n] >= 1) & (x[:, :n] <= 8)).all()  # data symbols, never blank or delimiter
    assert (x[:, n + delay - 1] == 9).all()  # the delimiter, T - 1 blanks after the data
    others = torch.ones(x.shape[1], dtype=torch.bool)
    others[:n], others[n + delay - 1] = False, False
    assert (x[:, others] == 0).all()
    assert torch.equal(y[:, -n:], x[:, :n]) and (y[:, :-n] == 0).all()
    assert len(x[:, :n].unique()) == 8  # every symbol drawn


def test_delayed_copy_is_the_input_delay_steps_earlier():
    task = build("delayed_copy")
    x, y = task.train.x.tolist(), task.train.y.tolist()
    for row_x, row_y in zip(x, y):
        assert all(row_y[t] == row_x[t - 9] for t in range(9, 50))
    assert task.score_start == 9 and task.d_input == task.d_output == 5
    assert set(sum(x, [])) == set(range(5))


def test_selective_copy_answers_are_the_data_tokens_in_order_of_position():
    task = build("selective_copy", seed=1)
    x, y = task.train.x, task.train.y  # (64, 60)
    P = 60 - 7
    firsts = []
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        found = [(t, tok) for t, tok in enumerate(row_x[:P]) if tok != 0]  # the test's own scan
        assert len(found) == 7 and all(1 <= tok <= 6 for _, tok in found)
        assert [tok for _, tok in found] == row_y[P:] and row_x[P:] == [7] * 7
        assert all(tok == 0 for tok in row_y[:P])
        firsts.append(found[0][0])
    assert task.score_start == P and (task.d_input, task.d_output) == (8, 7)
    positions = (x[:, :P] != 0).nonzero()[:, 1].float()  # uniform over [0, P): mean (P - 1) / 2 = 26
    assert abs(positions.mean().item() - 26) < 2.5 and positions.max() > 45 and min(firsts) < 5


def test_assoc_recall_answer_is_the_query_keys_value():
    task = build("assoc_recall", n_keys=6, n_values=5)
    x, y = task.train.x.tolist(), task.train.y
    assert task.train.y.dtype == torch.int64 and (task.d_input, task.d_output, task.pooling) == (12, 5, "last")
    for row, answer in zip(x, y.tolist()):
        pairs = [(row[i], row[i + 1]) for i in range(0, 38, 2)]
        assert all(k < 6 and 6 <= v < 11 for k, v in pairs)
        assert all(v == dict(pairs)[k] for k, v in pairs)  # one value per key in a sequence
        assert row[-2] == 11 and row[-1] < 6
        assert [v for k, v in pairs if k == row[-1]][0] == 6 + answer  # the query key's pair, found by scan
    assert set(y.tolist()) == set(range(5))


def test_induction_heads_answer_follows_the_first_trigger():
    task = build("induction_heads")
    for row, answer in zip(task.train.x.tolist(), task.train.y.tolist()):
        triggers = [t for t, tok in enumerate(row) if tok == 6]
        assert len(triggers) == 2 and triggers[1] == 29 and triggers[0] <= 27
        assert row[triggers[0] + 1] == answer < 6


def test_adding_markers_one_in_each_half_and_the_sum():
    task = build("adding", n_test=600)
    x, y = xs_ys(task.test)  # (600, 40, 2), (600, 1)
    assert x.dtype == y.dtype == torch.float32 and y.shape == (600, 1)
    values, marker = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all() and set(marker.unique().tolist()) == {0.0, 1.0}
    assert (marker[:, :20].sum(1) == 1).all() and (marker[:, 20:].sum(1) == 1).all()
    torch.testing.assert_close(y[:, 0], (values * marker).sum(1))
    assert (task.metric, task.head, task.pooling, task.encoder) == ("mse", "regression", "last", "linear")
    assert abs(((y - 1) ** 2).mean().item() - 1 / 6) < 0.03  # predicting 1 scores about 0.167 (std 0.008)
    first = marker[:, :20].argmax(1).float()  # uniform over the first half: mean 9.5 (std 0.23)
    assert abs(first.mean().item() - 9.5) < 0.9


@pytest.mark.parametrize("name", MEMORY)
def test_same_seed_same_bytes_other_seed_other_data(name):
    a, b, c = build(name, seed=5), build(name, seed=5), build(name, seed=6)
    ax, ay = xs_ys(a.train)
    bx, by = xs_ys(b.train)
    cx, _ = xs_ys(c.train)
    assert torch.equal(ax, bx) and torch.equal(ay, by) and ax.dtype == bx.dtype
    assert not torch.equal(ax, cx)
    assert not torch.equal(ax[:16], xs_ys(a.val)[0])


@pytest.mark.parametrize("name, params, match", [
    ("copy", dict(delay=0), "delay=0 must be an int >= 1"),
    ("copy", dict(n_copy=-2), "n_copy=-2 must be an int >= 1"),
    ("copy", dict(n_symbols=1), "n_symbols=1 must be an int >= 2"),
    ("copy", dict(n_train=0), "n_train=0 must be an int >= 1"),
    ("copy", dict(seed=-1), "seed=-1 must be an int >= 0"),
    ("delayed_copy", dict(seq_len=10, delay=10), "delay=10 must be < seq_len=10"),
    ("delayed_copy", dict(delay=-1), "delay=-1 must be an int >= 0"),
    ("delayed_copy", dict(seq_len=2.5), "seq_len=2.5 must be an int >= 1"),
    ("selective_copy", dict(seq_len=20, n_copy=11), "n_copy=11 is too large for seq_len=20"),
    ("selective_copy", dict(seq_len=0), "seq_len=0 must be an int >= 2"),
    ("assoc_recall", dict(seq_len=41), "seq_len=41 must be even"),
    ("assoc_recall", dict(n_keys=0), "n_keys=0 must be an int >= 1"),
    ("assoc_recall", dict(n_values=1), "n_values=1 must be an int >= 2"),
    ("induction_heads", dict(seq_len=2), "seq_len=2 must be an int >= 3"),
    ("adding", dict(seq_len=1), "seq_len=1 must be an int >= 2"),
    ("adding", dict(n_val=True), "n_val=True must be an int >= 1"),
])
def test_bad_parameters_are_rejected_before_any_work(name, params, match, monkeypatch):
    monkeypatch.setattr(memory, "generate", lambda *a: pytest.fail("generated data for bad parameters"))
    with pytest.raises(ValueError, match=match):
        build(name, **params)


def test_second_build_reads_the_cache(monkeypatch):
    first = build("selective_copy")
    monkeypatch.setattr(memory, "selective_copy_data", lambda *a: pytest.fail("built again"))
    second = build("selective_copy")  # the same parameters: read from the cache
    assert torch.equal(first.test.x, second.test.x) and torch.equal(first.test.y, second.test.y)
    with pytest.raises(pytest.fail.Exception, match="built again"):
        build("selective_copy", seed=9)  # other parameters: built, so the patch was in place


def test_generation_in_chunks_keeps_every_property(monkeypatch):
    monkeypatch.setattr(memory, "CHUNK", 3 * 60 + 1)  # 3 rows at a time
    task = build("selective_copy")
    x, y = task.train.x, task.train.y
    assert x.shape == (64, 60) and ((x[:, :53] != 0).sum(1) == 7).all()
    data = [[tok for tok in row[:53] if tok != 0] for row in x.tolist()]
    assert data == y[:, 53:].tolist() and len({tuple(d) for d in data}) == 64


def test_length_16384_builds_in_seconds():
    start = time.perf_counter()
    sizes = dict(n_train=16, n_val=4, n_test=4)
    tasks = [build_task("copy", delay=16384 - 20, **sizes), build_task("delayed_copy", seq_len=16384, **sizes),
             build_task("selective_copy", seq_len=16384, **sizes), build_task("assoc_recall", seq_len=16384, **sizes),
             build_task("induction_heads", seq_len=16384, **sizes), build_task("adding", seq_len=16384, **sizes)]
    assert time.perf_counter() - start < 10  # about 0.3 s unloaded
    assert all(len(t.train[0][0]) == 16384 for t in tasks)
    x, y = tasks[2].train.x, tasks[2].train.y  # selective copy: 16 data tokens spread over 16368 steps
    data = x[:, :-16]  # (16, 16368)
    assert ((data != 0).sum(1) == 16).all() and torch.equal(y[:, -16:], data[data != 0].reshape(16, 16))


def test_per_step_scoring_counts_only_the_answer_steps():
    task = build("copy")
    x, y, lengths = task.collate([task.train[i] for i in range(8)])
    assert x.dtype == y.dtype == torch.int64 and y.shape == (8, 42)
    perfect = torch.nn.functional.one_hot(y, task.d_output).float() * 20  # (8, 42, 9)
    _, _, correct, count = batch_stats(perfect, y, lengths, task)
    assert count == 8 * 6 and correct == 8 * 6
    blank = torch.zeros_like(perfect)
    blank[..., 0] = 20  # always "blank": right on the 36 unscored steps, wrong on every answer
    assert batch_stats(blank, y, lengths, task)[2] == 0


@pytest.mark.parametrize("name", MEMORY)
def test_show_prints_examples_and_saves_a_picture(name, tmp_path):
    task = build(name)
    text = SOURCES[name].show(task, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 5000 and text.startswith(name)
    assert len(text.splitlines()) >= 4
    if name == "copy":
        first = " ".join(str(t) for t in task.test.y[0, -6:].tolist())
        assert f"answer: {first}" in text


def test_token_runs():
    assert token_runs([5, 0, 0, 0, 0, 9, 9]) == "5 0*4 9 9"
    long = token_runs(list(range(100)))
    assert long.startswith("0 1 2") and "(60 items)" in long and long.endswith("98 99")


def test_configs_load_and_one_runs_at_length_4096():
    from diagssm.train import config
    from diagssm.tasks.registry import check_params

    root = Path(__file__).parents[1] / "configs"
    names = ("copy", "copy_4096", "delayed_copy", "selective_copy", "assoc_recall", "induction_heads", "adding")
    cfgs = {name: config.load(root / f"{name}.yaml") for name in names}
    for cfg in cfgs.values():
        assert cfg.task.name in MEMORY
        check_params(cfg.task.name, cfg.task.params, exclude=("seed",))
    p = cfgs["copy_4096"].task.params
    assert p["delay"] + 2 * p["n_copy"] >= 4096


def test_seeds_of_2_to_the_32_and_more_are_refused():
    """numpy's SeedSequence splits such ints into 32-bit words: (2**32, "train") drew as (0, "val")."""
    from diagssm.tasks.base import split_generator

    a = torch.rand(4, generator=split_generator(2 ** 32 - 1, "train"))
    assert not torch.equal(a, torch.rand(4, generator=split_generator(0, "val")))
    with pytest.raises(ValueError, match=r"seed=4294967296 must be < 2\*\*32"):
        split_generator(2 ** 32, "train")
