"""The .ts reader and the ucr task: small files written here, and aeon's GunPoint and
BasicMotions when the aeon wheel is installed."""
import re

import numpy as np
import pytest
import torch

from diagssm.tasks import timeseries
from diagssm.tasks.base import pad_collate
from diagssm.tasks.cache import DataError
from diagssm.tasks.timeseries_files import read_ts

HEADER = ["# a toy problem", "@problemName Toy", "@timestamps false", "@missing false", "@univariate true",
          "@equalLength true", "@seriesLength 4", "@classLabel true b a"]


def write(path, header, cases):
    path.write_text("\n".join(header + ["@data"] + cases) + "\n")
    return path


def toy_cases(n_per_class, rng, length=4, dims=1, labels=("a", "b")):
    """Lines of random cases (shifted per class), class after class."""
    lines = []
    for k, label in enumerate(labels):
        for _ in range(n_per_class):
            values = rng.normal(3.0 * k, 2.0, size=(dims, length)).round(3)
            lines.append(":".join(",".join(str(v) for v in row) for row in values) + f":{label}")
    return lines


def toy_pair(folder, n_train=10, n_test=3, rng=None, **kwargs):
    rng = rng or np.random.default_rng(0)
    header = kwargs.pop("header", HEADER)
    write(folder / "Toy_TRAIN.ts", header, toy_cases(n_train, rng, **kwargs))
    write(folder / "Toy_TEST.ts", header, toy_cases(n_test, rng, **kwargs))
    return folder


def test_read_univariate_values_labels_and_lines(tmp_path):
    cases = ["1,2,3,4:a", "# a comment between cases", "", "-1.5,0,0.25,1e2:b"]
    ts = read_ts(write(tmp_path / "u.ts", HEADER, cases))
    assert ts.problem == "Toy" and ts.classes == ("b", "a") and ts.n_dims == 1
    np.testing.assert_array_equal(ts.series[0][:, 0], [1, 2, 3, 4])
    np.testing.assert_array_equal(ts.series[1][:, 0], [-1.5, 0, 0.25, 100])
    assert ts.labels.tolist() == [1, 0]  # the order of @classLabel: b -> 0, a -> 1
    assert ts.lines == [len(HEADER) + 2, len(HEADER) + 5]


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    path = write(tmp_path / "bom.ts", HEADER, ["1,2,3,4:a", "5,6,7,8:b"])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Windows editors save UTF-8
    ts = read_ts(path)
    assert ts.problem == "Toy" and ts.labels.tolist() == [1, 0]


def test_read_multivariate_and_variable_length(tmp_path):
    header = ["@problemName MV", "@univariate false", "@dimensions 2", "@equalLength false",
              "@classLabel true x y"]
    ts = read_ts(write(tmp_path / "m.ts", header, ["1,2,3:4,5,6:x", "7,8:9,10:y"]))
    assert ts.n_dims == 2 and [s.shape for s in ts.series] == [(3, 2), (2, 2)]
    np.testing.assert_array_equal(ts.series[0], [[1, 4], [2, 5], [3, 6]])
    np.testing.assert_array_equal(ts.series[1], [[7, 9], [8, 10]])


BAD = [  # (header, cases, the message's pattern, the line it names)
    (HEADER[:1] + ["@colour blue"] + HEADER[1:], ["1,2,3,4:a"], "unknown tag '@colour'", 2),
    (["1,2,3:a"] + HEADER, [], "expected a @tag", 1),
    (HEADER[:4] + ["@univariate maybe"] + HEADER[5:], ["1,2,3,4:a"], "must be true or false", 5),
    (HEADER[:4] + ["@dimensions two"] + HEADER[5:], ["1,2,3,4:a"], "integer >= 1", 5),
    (HEADER[:2] + ["@timeStamps true"] + HEADER[3:], ["1,2,3,4:a"], "not supported", 3),
    (HEADER[:-1] + ["@classLabel false"], ["1,2,3,4:a"], "needs class labels", 8),
    (HEADER[:-1] + ["@targetLabel true"], ["1,2,3,4:1.5"], "regression", 8),
    (HEADER[:-1], ["1,2,3,4:a"], "before any '@classLabel", 8),
    (HEADER, ["1,2,3,4:a", "1,2,3,4:c"], "label 'c' is not one of", 11),
    (HEADER, ["1,2,3,4:1,2,3,4:a"], "2 dimension", 10),
    (HEADER, ["1,2,x,4:a"], "not a number", 10),
    (HEADER, ["1,2,3:a"], "@seriesLength says 4", 10),
    (HEADER, ["1,2,?,4:a"], "missing value", 10),
    (HEADER[:4] + ["@univariate false", "@dimensions 2"] + HEADER[5:], ["1,2,3,4:1,2,3:a"], "different lengths", 11),
]


@pytest.mark.parametrize("header, cases, pattern, line", BAD)
def test_bad_files_name_the_file_and_line(tmp_path, header, cases, pattern, line):
    path = write(tmp_path / "bad.ts", header, cases)
    with pytest.raises(DataError, match=re.escape(str(path)) + f", line {line}: .*" + re.escape(pattern)):
        read_ts(path)


def test_no_data_line_and_missing_file(tmp_path):
    path = tmp_path / "nodata.ts"
    path.write_text("\n".join(HEADER) + "\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + ": no @data line"):
        read_ts(path)
    with pytest.raises(DataError, match="absent.ts: no such file"):
        read_ts(tmp_path / "absent.ts")


def test_ucr_task_splits_labels_and_normalisation(tmp_path):
    toy_pair(tmp_path, n_train=10, n_test=3)
    task = timeseries.ucr_task(dataset="Toy", path=str(tmp_path), val_fraction=0.2, seed=0)
    assert (task.d_input, task.d_output, task.encoder, task.pooling) == (1, 2, "linear", "mean")
    # per class: round(0.2 * 10) = 2 to validation, 8 stay in train; the published test untouched
    for split, per_class in (("train", 8), ("val", 2), ("test", 3)):
        assert torch.bincount(task.split(split).y).tolist() == [per_class, per_class]
    x = task.train.x  # (16, 4, 1)
    assert x.dtype == torch.float32 and x.shape == (16, 4, 1) and task.train.lengths is None
    assert abs(float(x.mean())) < 1e-6 and abs(float(x.std(unbiased=False)) - 1) < 1e-5
    # the labels follow @classLabel b a: the 'a' cases (written first, near 0) get class 1
    assert task.test.y.tolist() == [1, 1, 1, 0, 0, 0]
    assert float(task.test.x[:3].mean()) < float(task.test.x[3:].mean())


def test_ucr_validation_rule_small_classes(tmp_path):
    rng = np.random.default_rng(1)
    write(tmp_path / "S_TRAIN.ts", HEADER, toy_cases(1, rng, labels=("a",)) + toy_cases(3, rng, labels=("b",)))
    write(tmp_path / "S_TEST.ts", HEADER, toy_cases(1, rng))
    task = timeseries.ucr_task(dataset="S", path=str(tmp_path), val_fraction=0.1)
    # class 'a' has one training case: it stays in train; class 'b' (3 cases) gives max(1, round(0.3)) = 1
    assert sorted(task.train.y.tolist()) == [0, 0, 1] and task.val.y.tolist() == [0]


def test_ucr_variable_length_multivariate_padding(tmp_path):
    header = ["@problemName V", "@univariate false", "@dimensions 2", "@equalLength false", "@classLabel true a b"]
    cases = [f"{','.join(['1'] * n)}:{','.join(['2'] * n)}:{'ab'[n % 2]}" for n in (3, 5, 4, 6, 2, 7)]
    write(tmp_path / "V_TRAIN.ts", header, cases + ["1,3:2,4:a", "5,1,2:1,1,1:b"])
    write(tmp_path / "V_TEST.ts", header, ["1,2,3,4,5,6,7,8:1,1,1,1,1,1,1,1:a"])
    task = timeseries.ucr_task(dataset="V", path=str(tmp_path), val_fraction=0.25)
    assert task.d_input == 2 and task.test.lengths.tolist() == [8]
    data = task.train
    for i in range(len(data)):
        x, y, n = data[i]
        assert x.shape == (data.x.shape[1], 2) and bool((x[n:] == 0).all())
    x, y, lengths = pad_collate([data[i] for i in range(len(data))])
    assert x.shape == (len(data), int(lengths.max()), 2) and lengths.tolist() == data.lengths.tolist()


def test_ucr_missing_values(tmp_path):
    header = HEADER[:3] + ["@missing true"] + HEADER[4:]
    write(tmp_path / "M_TRAIN.ts", header, ["1,2,?,4:a", "3,4,5,6:b", "1,1,2,2:a", "4,4,6,6:b"])
    write(tmp_path / "M_TEST.ts", header, ["?,2,3,4:a"])
    with pytest.raises(DataError, match=r"M_TRAIN.ts, line 10: missing value"):
        timeseries.ucr_task(dataset="M", path=str(tmp_path))
    task = timeseries.ucr_task(dataset="M", path=str(tmp_path), missing="mean", val_fraction=0.5)
    assert float(task.test.x[0, 0, 0]) == 0.0  # the training mean, after normalisation
    assert not torch.isnan(task.train.x).any() and not torch.isnan(task.val.x).any()


def test_ucr_test_file_must_match_train(tmp_path):
    toy_pair(tmp_path)
    write(tmp_path / "Toy_TEST.ts", HEADER[:-1] + ["@classLabel true a c"], ["1,2,3,4:c"])
    with pytest.raises(DataError, match="Toy_TEST.ts: @classLabel a c differs"):
        timeseries.ucr_task(dataset="Toy", path=str(tmp_path))


def test_ucr_deterministic_in_seed(tmp_path):
    toy_pair(tmp_path, n_train=20)
    a, b = (timeseries.ucr_task(dataset="Toy", path=str(tmp_path), seed=3) for _ in range(2))
    c = timeseries.ucr_task(dataset="Toy", path=str(tmp_path), seed=4)
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split).x, b.split(split).x) and torch.equal(a.split(split).y, b.split(split).y)
    assert not torch.equal(a.val.x, c.val.x)
    assert torch.equal(a.test.y, c.test.y)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(dataset="../etc"), "dataset='../etc'"), (dict(dataset=3), "dataset=3"), (dict(path=5), "path=5"),
    (dict(val_fraction=0), "val_fraction=0"), (dict(val_fraction=0.6), "val_fraction=0.6"),
    (dict(val_fraction=True), "val_fraction=True"), (dict(missing="drop"), "missing='drop'"),
    (dict(seed=-1), "seed=-1"), (dict(dataset="NoSuchSet"), "dataset='NoSuchSet' is not a set shipped"),
])
def test_ucr_rejects_bad_params(kwargs, pattern):
    with pytest.raises(ValueError, match=re.escape(pattern)):
        timeseries.ucr_task(**kwargs)


def test_ucr_missing_pair_lists_what_is_there(tmp_path):
    toy_pair(tmp_path)
    with pytest.raises(DataError, match="GunPoint_TRAIN.ts: no such file .*TRAIN files there: Toy_TRAIN.ts"):
        timeseries.ucr_task(path=str(tmp_path))


def test_ucr_second_build_reads_the_cache(tmp_path, monkeypatch):
    toy_pair(tmp_path)
    first = timeseries.ucr_task(dataset="Toy", path=str(tmp_path))

    def fail(*args, **kwargs):
        raise AssertionError("the .ts files were read again")

    monkeypatch.setattr(timeseries, "read_ts", fail)
    second = timeseries.ucr_task(dataset="Toy", path=str(tmp_path))
    assert torch.equal(first.train.x, second.train.x)


def test_show_series_text_and_picture(tmp_path):
    toy_pair(tmp_path)
    task = timeseries.ucr_task(dataset="Toy", path=str(tmp_path))
    text = timeseries.show_series(task, tmp_path / "ucr.png")
    assert len(text.splitlines()) == 3 and "class" in text and "length 4" in text
    assert (tmp_path / "ucr.png").stat().st_size > 1000


needs_aeon = pytest.mark.skipif(not {"GunPoint", "BasicMotions"} <= set(timeseries.shipped_sets()),
                                reason="aeon's .ts files are not installed (pip install --no-deps aeon)")


@needs_aeon
def test_gunpoint_from_aeon():
    task = timeseries.ucr_task(dataset="GunPoint")
    assert (len(task.train) + len(task.val), len(task.test)) == (50, 150)
    assert task.train.x.shape[1:] == (150, 1) and task.test.x.shape[1:] == (150, 1)
    assert (task.d_input, task.d_output) == (1, 2) and task.train.classes == ["1", "2"]
    assert len(task.val) == 5  # classes of 24 and 26 cases: round(2.4) + round(2.6)


@needs_aeon
def test_basicmotions_from_aeon():
    task = timeseries.ucr_task(dataset="BasicMotions")
    assert (len(task.train) + len(task.val), len(task.test)) == (40, 40)
    assert task.test.x.shape[1:] == (100, 6) and (task.d_input, task.d_output) == (6, 4)
    assert torch.bincount(task.test.y).tolist() == [10, 10, 10, 10]
    assert task.train.classes == ["Standing", "Running", "Walking", "Badminton"]


def test_source_record():
    source = timeseries.SOURCES["ucr"]
    assert source.kind == "package" and source.card == "docs/data/ucr_uea.md"
    reason = source.available()
    assert (reason is None) == ("GunPoint" in timeseries.shipped_sets())
