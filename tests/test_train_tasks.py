"""Tasks: the registry, the recall and delay data (exact contents, seeds, splits), padding."""
import pytest
import torch

from diagssm.tasks.base import pad_collate, split_generator
from diagssm.tasks.memory import delayed_signal
from diagssm.tasks.registry import TASKS, build_task, task_params

SMALL = dict(n_train=64, n_val=16, n_test=32)


def test_registry():
    assert {"recall", "delay", "listops", "pathfinder", "sc_synthetic", "copy", "fashion_mnist", "ucr"} <= set(TASKS)
    assert task_params("recall")["seq_len"] == 256 and task_params("delay")["delay"] == 200
    with pytest.raises(ValueError, match="task 'imdb' is not registered; known tasks: adding, assoc_recall"):
        build_task("imdb")
    with pytest.raises(ValueError, match="unknown key 'L' in section 'task.params' for task 'delay'"):
        build_task("delay", L=5)


def test_recall_contents():
    task = build_task("recall", seq_len=40, n_symbols=10, n_noise=6, **SMALL)
    got = (task.d_input, task.d_output, task.encoder, task.pooling, task.metric)
    assert got == (16, 10, "embedding", "last", "accuracy")
    x, y = task.train.x, task.train.y  # (64, 40), (64,)
    assert x.shape == (64, 40) and torch.equal(x[:, 0], y)
    assert ((x[:, 1:] >= 10) & (x[:, 1:] < 16)).all()  # only noise after step 0: no symbol repeats
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) > 5
    assert len(task.val) == 16 and len(task.test) == 32


def test_recall_is_deterministic_by_seed_and_splits_differ():
    a, b, c = (build_task("recall", seq_len=32, seed=s, **SMALL) for s in (0, 0, 1))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    assert not torch.equal(a.train.x[:16], a.val.x)


def test_recall_variable_lengths_and_padding():
    task = build_task("recall", seq_len=30, min_len=10, **SMALL)
    lengths = task.train.lengths
    assert lengths.min() >= 10 and lengths.max() <= 30 and len(set(lengths.tolist())) > 5
    items = [task.train[i] for i in range(8)]
    x, y, got = task.collate(items)  # padded to the batch's longest sequence
    assert torch.equal(got, lengths[:8]) and x.shape == (8, int(lengths[:8].max()))
    for i, (xi, yi, n) in enumerate(items):
        assert torch.equal(x[i, :n], xi[:n]) and (x[i, n:] == 0).all() and y[i] == yi


def test_max_length_of_variable_length_tasks_goes_to_the_model():
    """A task of variable lengths gives its longest sequence as the model's L (DSS-softmax's system
    length, fixed for every batch); a fixed-length task gives None (each batch has its length)."""
    from diagssm.train.config import from_dict
    from diagssm.train.setup import make_model

    varying = build_task("recall", seq_len=30, min_len=10, **SMALL)
    longest = max(int(d.lengths.max()) for d in (varying.train, varying.val, varying.test))
    assert varying.max_length == longest and longest > 10
    assert build_task("recall", seq_len=30, **SMALL).max_length is None
    cfg = from_dict({"task": {"name": "recall"},
                     "model": {"layer": "dss", "layer_kwargs": {"variant": "softmax"}, "d_model": 8}})
    assert make_model(cfg.model, varying).L == longest


def test_delay_contents():
    task = build_task("delay", seq_len=50, delay=7, smooth=4, seed=2, **SMALL)
    assert (task.d_input, task.head, task.pooling, task.metric, task.score_start) == (1, "per_step", "none", "mse", 7)
    x, y = task.train.x, task.train.y  # (64, 50, 1)
    torch.testing.assert_close(y[:, 7:], x[:, :-7])
    assert (y[:, :7] == 0).all()
    u, _ = delayed_signal(64, 50, 7, smooth=4, generator=split_generator(2, "train"))
    assert torch.equal(u, x)  # the train split is delayed_signal's draw from the (seed, "train") stream


def test_pad_collate_per_step_targets():
    items = [(torch.ones(5, 2), torch.full((5, 1), 2.0)), (torch.ones(3, 2), torch.full((3, 1), 3.0))]
    from diagssm.tasks.base import per_step_collate

    x, y, lengths = per_step_collate()(items)
    assert x.shape == (2, 5, 2) and y.shape == (2, 5, 1) and lengths.tolist() == [5, 3]
    assert (y[1, 3:] == 0).all() and (y[1, :3] == 3).all()
    x, y, lengths = pad_collate([(torch.arange(4), 1), (torch.arange(2), 0)])
    assert x.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]] and y.tolist() == [1, 0]


@pytest.mark.parametrize("params, message", [
    (dict(seq_len=0), "seq_len=0 must be an int >= 1"),
    (dict(seq_len=10, min_len=11), "min_len=11 must be <= seq_len=10"),
    (dict(n_symbols=1), "n_symbols=1 must be an int >= 2"),
    (dict(seed=-1), "seed=-1 must be an int >= 0"),
    (dict(n_train=2.5), "n_train=2.5 must be an int >= 1"),
])
def test_recall_bad_params(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_task("recall", **{**SMALL, **params})
