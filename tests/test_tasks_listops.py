"""ListOps: generator labels against an evaluator written here, length and depth bounds, distinct
splits, determinism, the cache, and the reader of the LRA release TSV files."""
import statistics

import pytest
import torch

from diagssm.tasks import cache, listops, listops_gen, registry
from diagssm.tasks.base import pad_collate

SMALL = dict(n_train=150, n_val=30, n_test=30, min_length=20, max_length=120, workers=1)


# --- an evaluator independent of listops_gen: recursive descent over the words -----------------
def parse(words, pos=0, depth=1):
    """(value, next position, deepest node depth, argument counts) of the subtree at words[pos]."""
    word = words[pos]
    if word.isdigit():
        return int(word), pos + 1, depth, []
    assert word in ("[MIN", "[MAX", "[MED", "[SM"), word
    args, deepest, counts, pos = [], depth, [], pos + 1
    while words[pos] != "]":
        value, pos, d, c = parse(words, pos, depth + 1)
        args.append(value)
        deepest, counts = max(deepest, d), counts + c
    value = {"[MIN": min, "[MAX": max, "[SM": lambda a: sum(a) % 10,
             "[MED": lambda a: int(statistics.median(a))}[word](args)
    return value, pos + 1, deepest, counts + [len(args)]


def value_of(text):
    words = text.replace("(", " ").replace(")", " ").split()
    value, end, _, _ = parse(words)
    assert end == len(words), "trailing words"
    return value


def items(dataset):
    for i in range(len(dataset)):
        x, y, n = dataset[i]
        yield x, int(y), int(n)


HAND = [("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[MED 3 1 4 1 5 ]", 3), ("[SM 8 9 ]", 7),
        ("[MED 1 2 3 4 ]", 2), ("[MED 9 8 ]", 8), ("[MIN 5 [MAX 1 2 ] 7 ]", 2),
        ("[SM [MAX 9 9 ] [MIN 8 9 ] [MED 0 0 9 ] ]", 7), ("[SM 9 9 9 9 9 9 9 9 9 9 ]", 0), ("6", 6)]


@pytest.mark.parametrize("text,value", HAND)
def test_hand_written_expressions(text, value):
    assert value_of(text) == value
    ids = [listops_gen.TOKEN_ID[w] for w in text.split()]
    assert listops_gen.evaluate(ids) == value
    assert listops_gen.decode(ids) == text


def test_vocabulary_table():
    v = listops_gen.VOCAB
    assert len(v) == 16 and v[0] == "<pad>" and v[1] == "0" and v[10] == "9"
    assert v[11:] == ("[MIN", "[MAX", "[MED", "[SM", "]")


def test_lra_text_matches_the_release_format():
    ids = [listops_gen.TOKEN_ID[w] for w in "[MAX 2 [MIN 4 7 ] ]".split()]
    assert listops_gen.lra_text(ids) == "( ( ( [MAX 2 ) ( ( ( [MIN 4 ) 7 ) ] ) ) ] )"
    assert listops.tokenize(listops_gen.lra_text(ids), "here") == ids


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small generated task, built once (its own cache folder)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DIAGSSM_CACHE", str(tmp_path_factory.mktemp("listops_cache")))
    task = listops.listops_task(**SMALL)
    mp.undo()
    return task


def test_generated_labels_agree_with_the_independent_evaluator(small):
    labels = []
    for split in ("train", "val", "test"):
        for x, y, n in items(small.split(split)):
            text = listops_gen.decode(x[:n].tolist())
            assert value_of(text) == y
            labels.append(y)
    counts = torch.bincount(torch.tensor(labels), minlength=10)
    assert len(labels) == 210 and (counts > 0).sum() >= 8  # not one constant label


def test_lengths_depth_arguments_and_padding(small):
    lengths = []
    for split in ("train", "val", "test"):
        data = small.split(split)
        assert data.x.dtype == torch.uint8 and data.x.shape[1] == int(data.lengths.max())
        for x, y, n in items(data):
            assert 20 < n < 120
            assert (x[:n] != 0).all() and (x[n:] == 0).all()
            _, end, deepest, counts = parse(listops_gen.decode(x[:n].tolist()).split())
            assert end == n and deepest <= 10 and min(counts) >= 2 and max(counts) <= 10
            lengths.append(n)
    assert max(lengths) - min(lengths) > 50  # spread over the window, not one length


def test_depth_and_argument_bounds_follow_the_parameters(tmp_path):
    task = listops.listops_task(n_train=60, n_val=5, n_test=5, min_length=8, max_length=60, max_depth=3,
                                max_args=3, workers=1)
    deepest = 0
    for x, y, n in items(task.train):
        value, end, d, counts = parse(listops_gen.decode(x[:n].tolist()).split())
        assert value == y and 8 < n < 60 and d <= 3 and max(counts) <= 3
        deepest = max(deepest, d)
    assert deepest == 3  # digits do sit at max_depth


def test_no_expression_repeats_within_or_across_splits(small):
    seen = set()
    for split in ("train", "val", "test"):
        for x, y, n in items(small.split(split)):
            seen.add(bytes(x[:n].tolist()))
    assert len(seen) == 210


def test_a_narrow_window_yields_exactly_the_distinct_trees_it_allows():
    # 3 < length < 5 leaves length 4 only: an operator with two digits, 4 * 10 * 10 = 400 trees
    tokens, lengths, values = listops_gen.generate(300, 3, 5, seed=1, workers=1)
    trees = {bytes(tokens[4 * i:4 * i + 4]) for i in range(300)}
    assert (lengths == 4).all() and len(trees) == 300
    for i in range(300):
        assert listops_gen.evaluate(tokens[4 * i:4 * i + 4].tolist()) == values[i]
    with pytest.raises(ValueError, match="distinct trees") as err:
        listops_gen.generate(450, 3, 5, seed=1, workers=1)
    found = int(str(err.value).split("only ")[1].split(" ")[0])
    assert 380 <= found <= 400


def test_same_seed_same_bytes_other_seed_other_data(small, tmp_path, monkeypatch):
    monkeypatch.setenv("DIAGSSM_CACHE", str(tmp_path / "a"))
    again = listops.listops_task(**SMALL)
    for split in ("train", "val", "test"):
        a, b = small.split(split), again.split(split)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.lengths, b.lengths)
    other = listops.listops_task(**SMALL, seed=1)
    assert not torch.equal(other.train.lengths, small.train.lengths)


def test_the_data_does_not_depend_on_the_chunking_into_workers(monkeypatch):
    monkeypatch.setattr(listops_gen, "CHUNK", 7)  # 40 trees: 6 chunks
    one = listops_gen.generate(40, 10, 80, seed=3, workers=1)
    chunks = [listops_gen.generate_chunk((3, k, 7, 10, 80, 10, 10)) for k in range(6)]
    trees = [t for c in chunks for t in c[0]][:40]
    assert b"".join(trees) == one[0].tobytes()
    assert [v for c in chunks for v in c[1]][:40] == one[2].tolist()


@pytest.mark.slow
def test_two_worker_processes_build_the_same_bytes(monkeypatch):
    monkeypatch.setattr(listops_gen, "CHUNK", 50)
    one = listops_gen.generate(200, 20, 200, seed=4, workers=1)
    two = listops_gen.generate(200, 20, 200, seed=4, workers=2)
    assert all((a == b).all() for a, b in zip(one, two))


def test_the_second_build_reads_the_cache(monkeypatch):
    params = dict(n_train=20, n_val=5, n_test=5, min_length=10, max_length=50, workers=1)
    first = listops.listops_task(**params)

    def fail(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(listops_gen, "generate", fail)
    second = listops.listops_task(**{**params, "workers": 2})  # workers is not part of the data
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.test.y, second.test.y)
    with pytest.raises(AssertionError, match="generated again"):
        listops.listops_task(**{**params, "n_test": 6})


@pytest.mark.parametrize("params,match", [
    (dict(min_length=600, max_length=500), "strictly between"),
    (dict(min_length=500, max_length=501), "strictly between"),
    (dict(min_length=0), "min_length=0"),
    (dict(max_length=-5), "max_length=-5"),
    (dict(n_train=0), "n_train=0"),
    (dict(n_val=2.5), "n_val=2.5"),
    (dict(max_depth=1), "max_depth=1"),
    (dict(max_args=1), "max_args=1"),
    (dict(seed=-1), "seed=-1"),
    (dict(workers=0), "workers=0"),
    (dict(min_length=20, max_length=100, max_depth=2, max_args=3), "at most 5 tokens"),
])
def test_bad_parameters_are_refused_before_any_work(params, match, monkeypatch):
    monkeypatch.setattr(listops_gen, "generate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(ValueError, match=match):
        listops.listops_task(**params)


def test_task_record_and_collate(small):
    assert (small.d_input, small.d_output) == (16, 10)
    assert (small.encoder, small.head, small.pooling, small.metric) == ("embedding", "classification",
                                                                        "mean", "accuracy")
    x, y, lengths = pad_collate([small.train[i] for i in range(4)])
    assert x.dtype == torch.int64 and x.shape == (4, int(lengths.max()))
    assert torch.equal(lengths, small.train.lengths[:4]) and int(x.max()) <= 15
    built = registry.build_task("listops", **SMALL)
    assert torch.equal(built.val.x, small.val.x)
    assert registry.SOURCES["listops"].kind == "generated"
    assert registry.SOURCES["listops_lra"].kind == "files"


def test_show_prints_three_examples_and_saves_a_picture(small, tmp_path):
    text = registry.SOURCES["listops"].show(small, tmp_path / "listops.png")
    lines = text.splitlines()
    assert len(lines) == 3 and all(line.startswith("label ") for line in lines)
    assert all(len(line) < 140 for line in lines)
    assert (tmp_path / "listops.png").stat().st_size > 10_000


# --- the reader of the LRA release files --------------------------------------------------------
ROWS = [("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[MED 3 1 4 1 5 ]", 3), ("[SM 8 9 ]", 7), ("[MED 1 2 3 4 ]", 2)]


def write_tsv(path, rows, header="Source\tTarget", newline="\r\n"):
    """A release-style file: csv.writer(delimiter='\\t') ends lines with \\r\\n."""
    lines = [header] + [f"{listops_gen.lra_text([listops_gen.TOKEN_ID[w] for w in t.split()])}\t{v}"
                        for t, v in rows]
    path.write_text(newline.join(lines) + newline)
    return path


def release(folder, train=ROWS, val=ROWS[:2], test=ROWS[2:]):
    folder.mkdir(exist_ok=True)
    for name, rows in (("basic_train.tsv", train), ("basic_val.tsv", val), ("basic_test.tsv", test)):
        write_tsv(folder / name, rows)
    return folder


def test_reader_parses_release_files(tmp_path):
    task = listops.listops_lra_task(path=str(release(tmp_path / "lra")))
    assert [len(task.split(s)) for s in ("train", "val", "test")] == [4, 2, 2]
    texts = [(listops_gen.decode(x[:n].tolist()), y) for x, y, n in items(task.train)]
    assert texts == ROWS
    assert [y for _, y, _ in items(task.test)] == [7, 2]
    assert task.train.x.dtype == torch.uint8 and (task.d_input, task.d_output, task.pooling) == (16, 10, "mean")
    assert registry.SOURCES["listops_lra"].available() is None


def test_reader_skips_a_byte_order_mark(tmp_path):
    folder = release(tmp_path / "lra")
    path = folder / "basic_train.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    task = listops.listops_lra_task(path=str(folder))
    assert [(listops_gen.decode(x[:n].tolist()), y) for x, y, n in items(task.train)] == ROWS


def test_reader_skips_blank_lines(tmp_path):
    """A blank last line (a hand-edited file) had been an error: ':6: no tab'."""
    folder = release(tmp_path / "lra")
    path = folder / "basic_train.tsv"
    path.write_bytes(path.read_bytes() + b"\r\n")
    task = listops.listops_lra_task(path=str(folder))
    assert [(listops_gen.decode(x[:n].tolist()), y) for x, y, n in items(task.train)] == ROWS


def test_reader_reads_generated_expressions_back(small, tmp_path):
    rows = [(listops_gen.decode(x[:n].tolist()), y) for x, y, n in items(small.val)]
    task = listops.listops_lra_task(path=release(tmp_path / "lra", rows, rows[:3], rows[3:6]))
    assert torch.equal(task.train.x, small.val.x) and torch.equal(task.train.y, small.val.y)


def test_reader_max_length_cuts_drops_or_refuses(tmp_path):
    folder = release(tmp_path / "lra", val=ROWS[2:])  # train lengths 9, 7, 4, 6; val 4, 6
    cut = listops.listops_lra_task(path=folder, max_length=6)
    assert cut.train.lengths.tolist() == [6, 6, 4, 6] and cut.train.y.tolist() == [9, 3, 7, 2]
    assert listops_gen.decode(cut.train.x[0].tolist()) == "[MAX 2 9 [MIN 4 7"
    drop = listops.listops_lra_task(path=folder, max_length=6, too_long="drop")
    assert drop.train.lengths.tolist() == [4, 6] and drop.train.y.tolist() == [7, 2]
    with pytest.raises(cache.DataError, match=r"basic_train.tsv:2: 9 tokens, more than max_length=6"):
        listops.listops_lra_task(path=folder, max_length=6, too_long="error")
    with pytest.raises(cache.DataError, match=r"basic_train.tsv: no rows after the header \(all longer"):
        listops.listops_lra_task(path=folder, max_length=3, too_long="drop")


@pytest.mark.parametrize("content,match", [
    ("Source,Target\r\n", r"line 1 .*expected the header"),
    ("", r"line 1 .*expected the header"),
    ("Source\tTarget\r\n", "no rows after the header"),
    ("Source\tTarget\r\n( [SM 8 ) 9 ) ] )  7\r\n", r":2: no tab"),
    ("Source\tTarget\r\n[SM 8 9 ]\t7\r\n[SM 8 9 ]\t10\r\n", r":3: label '10'; expected a digit"),
    ("Source\tTarget\r\n[SM 8 9 ]\tseven\r\n", r":2: label 'seven'"),
    ("Source\tTarget\r\n[SM 8 X ]\t7\r\n", r":2: unknown token 'X'"),
    ("Source\tTarget\r\n[SM 8 9\t7\r\n", r":2: malformed expression"),
    ("Source\tTarget\r\n[SM 8 9 ] 1\t7\r\n", r":2: malformed expression"),
    ("Source\tTarget\r\n[SM 8 9 ]\t6\r\n", r":2: label 6, but the expression's value is 7"),
])
def test_reader_names_the_file_and_line_of_bad_input(tmp_path, content, match):
    folder = release(tmp_path / "lra")
    (folder / "basic_val.tsv").write_text(content)
    with pytest.raises(cache.DataError, match=match) as err:
        listops.listops_lra_task(path=folder)
    assert "basic_val.tsv" in str(err.value)


def test_reader_label_check_can_be_switched_off(tmp_path):
    folder = release(tmp_path / "lra")
    (folder / "basic_test.tsv").write_text("Source\tTarget\n[SM 8 9 ]\t6\n")
    task = listops.listops_lra_task(path=folder, check_labels=False)
    assert task.test.y.tolist() == [6]


def test_reader_missing_file_and_bad_parameters(tmp_path):
    folder = release(tmp_path / "lra")
    (folder / "basic_test.tsv").unlink()
    with pytest.raises(cache.DataError, match=r"basic_test.tsv: no such file"):
        listops.listops_lra_task(path=folder)
    with pytest.raises(ValueError, match="path=None"):
        listops.listops_lra_task()
    with pytest.raises(ValueError, match="too_long='trim'"):
        listops.listops_lra_task(path=folder, too_long="trim")
    with pytest.raises(ValueError, match="max_length=0"):
        listops.listops_lra_task(path=folder, max_length=0)


def test_reader_cache_is_reused_until_a_file_changes(tmp_path, monkeypatch):
    folder = release(tmp_path / "lra")
    first = listops.listops_lra_task(path=folder)
    real = listops.read_tsv
    monkeypatch.setattr(listops, "read_tsv", lambda *a, **k: pytest.fail("read again"))
    again = listops.listops_lra_task(path=folder)
    assert torch.equal(first.train.x, again.train.x)
    write_tsv(folder / "basic_val.tsv", ROWS[1:])  # new size and time: read again
    monkeypatch.setattr(listops, "read_tsv", real)
    changed = listops.listops_lra_task(path=folder)
    assert [y for _, y, _ in items(changed.val)] == [3, 7, 2]


def test_the_cpu_config_names_valid_parameters():
    from pathlib import Path

    from diagssm.train import config

    cfg = config.load(Path(__file__).parents[1] / "configs" / "listops.yaml")
    assert cfg.task.name == "listops"
    assert cfg.task.params == dict(min_length=100, max_length=512, n_train=20000, n_val=1000, n_test=1000)
    listops._check_generator(**{**dict(n_train=1, n_val=1, n_test=1, max_depth=10, max_args=10, seed=0,
                                       workers=None), **cfg.task.params})
