"""Pathfinder / Path-X: the generator's contours, markers and labels, the task contract, and the
reader of the LRA release folders (on a tiny folder written here)."""
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from diagssm.tasks import cache, pathfinder, registry
from diagssm.tasks import pathfinder_draw as draw
from diagssm.tasks import pathfinder_snakes as snakes

EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: a paddle at 45 degrees is a diagonal pixel chain


def examples(resolution, contour_length, n, seed=0):
    s = draw.lra_settings(resolution, contour_length)
    rng = np.random.default_rng(seed)
    return s, [snakes.draw_example(s, i % 2, rng) for i in range(n)]


@pytest.fixture(scope="module")
def pf32():
    """24 images at 32x32, contour length 14 (LRA's hard setting), and 16 at length 6."""
    return [examples(32, 14, 24), examples(32, 6, 16, seed=1)]


def rasterise(points, shape):
    """The polyline through `points` (row, col), drawn with 8-connected pixel steps."""
    out = np.zeros(shape, dtype=bool)
    for p, q in zip(points[:-1], points[1:]):
        n = int(4 * np.abs(q - p).max()) + 1
        rows, cols = (np.rint(np.linspace(p[i], q[i], n)).astype(int) for i in (0, 1))
        keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        out[rows[keep], cols[keep]] = True
    return out


def same_region(mask, a, b):
    """Does an 8-connected flood fill of `mask` from pixel a reach pixel b?"""
    labels = ndimage.label(mask, EIGHT)[0]
    return bool(labels[tuple(a)] > 0 and labels[tuple(a)] == labels[tuple(b)])


# ---------------------------------------------------------------- the generator

def test_lra_settings_keep_python2_integer_division():
    for res, cl, length, count in ((32, 14, 4, 5), (32, 6, 2, 10), (64, 14, 4, 5), (64, 9, 3, 7), (128, 14, 4, 8),
                                   (128, 6, 2, 17)):
        s = draw.lra_settings(res, cl)
        assert (s.distractor_length, s.n_distractors) == (length, count), (res, cl)
    s = draw.lra_settings(128, 14)
    assert (s.margins, s.seed_distance, s.paddle_thickness, s.continuity) == ((2, 3), 20, 1.5, 1.8)


def test_each_target_is_one_dashed_contour_from_tail_to_head(pf32):
    """What is checked: each target contour rendered ALONE (the generator's own paddles of that
    contour, ink > 20% of its peak), with its dashes bridged by a dilation of radius margin + 1
    (the gaps are about 2 * margin), is ONE 8-connected region, and it holds both of the
    contour's ends (where the markers go). Other contours are left out on purpose: at LRA's
    settings they may touch this one (see the next tests)."""
    for s, exs in pf32:
        for e in exs:
            for snake in e["snakes"][:2]:
                ink = snakes.contour_ink(snake, s, e["image"].shape)
                region = ndimage.binary_dilation(ink > 0.2 * ink.max(), draw.disk(e["margin"] + 1).astype(bool))
                assert ndimage.label(region, EIGHT)[1] == 1
                assert same_region(region, snake.tail, snake.head)
                assert len(snake.paddles) == s.contour_length


def test_markers_sit_on_the_contour_ends_the_label_names(pf32):
    """What is checked: marker 1 is centred on the tail of target c0 and marker 2 on the head of
    target c1 (the generator's bookkeeping), c0 == c1 exactly for label 1, the markers are drawn
    (the image is bright at both centres) and the two ends of a positive are distinct points."""
    for s, exs in pf32:
        for e in exs:
            c0, c1 = e["contours"]
            targets = e["snakes"][:2]
            assert list(e["ends"][0]) == targets[c0 - 1].tail and list(e["ends"][1]) == targets[c1 - 1].head
            assert (c0 == c1) == bool(e["label"])
            assert all(e["image"][tuple(end)] >= 200 for end in e["ends"])
            assert not np.array_equal(e["ends"][0], e["ends"][1])


def test_flood_fill_from_marker_1(pf32):
    """What is checked, with 8-connected flood fills from marker 1's centre:
    positives: on the image's pixels (image > 20% grey) plus every contour's centre line (which
    bridges the dash gaps), the fill reaches marker 2 in every positive;
    negatives: on marker 1's own contour (its ink alone > 20% of its peak, plus its centre line)
    the fill does not reach marker 2 in at least 85% of negatives. Not all: the original lets the
    two targets' newest paddles overlap, so marker 2 may touch marker 1's contour (2% of 200
    negatives at 32x32, length 14). On the image's pixels negatives are mostly joined at 32x32
    (92% at length 14): LRA's settings let contours run within a pixel of each other, so at this
    size the contours' continuity, not a gap, separates them (docs/data/pathfinder.md)."""
    apart = []
    for s, exs in pf32:
        for e in exs:
            shape = e["image"].shape
            lines = [rasterise(snakes.contour_path(snake, s), shape) for snake in e["snakes"]]
            if e["label"]:
                assert same_region((e["image"] > 0.2 * 255) | np.any(lines, axis=0), *e["ends"])
            else:
                a = e["snakes"][e["contours"][0] - 1]
                ink = snakes.contour_ink(a, s, shape)
                own = (ink > 0.2 * ink.max()) | lines[e["contours"][0] - 1]
                apart.append(not same_region(own, *e["ends"]))
    assert len(apart) == 20 and np.mean(apart) >= 0.85


def test_images_are_uint8_scaled_to_their_maximum(pf32):
    for s, exs in pf32:
        for e in exs:
            img = e["image"]
            assert img.dtype == np.uint8 and img.shape == (32, 32) and img.max() == 255 and img.min() == 0
            assert 0.05 < (img > 0).mean() < 0.9  # ink, not an empty or a full image
            assert e["ids"].max() <= 2 + s.n_distractors and set(np.unique(e["ids"][img > 128])) - {0}


def test_distractors_are_drawn(pf32):
    for s, exs in pf32:
        counts = [len(e["snakes"]) - 2 for e in exs]
        assert max(counts) == s.n_distractors and np.mean(counts) > 0.5 * s.n_distractors
        for e in exs:
            assert all(len(d.paddles) == s.distractor_length for d in e["snakes"][2:])


# ---------------------------------------------------------------- fast paths against their references

def candidates_ref(centre, angle, radius, mask, margin, continuity):
    """snakes.get_coords_cmf as written: full-image dilation, float samples, np.unique on rows."""
    H, W = mask.shape
    dilated = draw.dilate(mask, draw.disk(margin))
    deg = np.arange(0, 360, 360.0 / (2 * radius * np.pi)) * np.pi / 180
    y, x = centre[0] + radius * np.sin(deg), centre[1] + radius * np.cos(deg)
    coords = np.stack([y, x], 1).astype(int)[(y < H) & (y >= 0) & (x < W) & (x >= 0)]
    coords = np.unique(coords, axis=0)
    d = coords - np.asarray(centre)
    angles = np.arctan2(d[:, 0], d[:, 1])
    turn = np.minimum(np.abs(angles - angle), 2 * np.pi - np.abs(angles - angle))
    w = np.maximum(np.cos(np.minimum(turn * continuity, 0.5 * np.pi)), 0) ** 2
    pmf = (1 - dilated[coords[:, 0], coords[:, 1]]) * w
    if len(coords) == 0 or pmf.sum() < 1e-4:  # a dead end: no pixel, or (almost) no free probability
        return None
    return coords, angles, np.cumsum(pmf / pmf.sum())


def test_candidates_match_the_original_formulation():
    rng = np.random.default_rng(0)
    dead_ends = 0
    for trial in range(40):
        mask = np.clip(rng.random((32, 32)) * (rng.random((32, 32)) < 0.1) * 1.5, 0, 1)
        centre = [int(v) for v in rng.integers(-2, 34, 2)]
        angle, radius, margin = rng.uniform(-np.pi, np.pi), int(rng.integers(3, 9)), int(rng.integers(1, 4))
        fast = draw.candidates(centre, angle, radius, draw.dilate(mask, draw.disk(margin)), 1.8)
        ref = candidates_ref(centre, angle, radius, mask, margin, 1.8)
        assert (fast is None) == (ref is None)  # the same dead ends (these had been skipped unchecked)
        dead_ends += fast is None
        for a, b in zip(fast or (), ref or ()):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert 0 < dead_ends < 20  # both kinds of trial ran


def test_occupancy_keeps_the_dilated_mask_in_step():
    """`near` updated paddle by paddle (cached patches inside, local recomputation at the borders)
    equals the dilation of the whole collision mask."""
    s = draw.lra_settings(128, 14)
    rng = np.random.default_rng(1)
    occ = draw.Occupancy(np.zeros((40, 40)), 3)
    for start in ([0, 0], [39, 20], [20, 20], [2, 37], [25, 5], [38, 39]):
        occ.add(draw.Paddle(tuple(start), float(rng.uniform(-np.pi, np.pi)), 1.0, 3), s)
        np.testing.assert_array_equal(occ.near, draw.dilate(occ.mask, draw.disk(3)))
    assert occ.mask.max() == 1.0


def test_dilate_follows_opencv_anchor_convention():
    image = np.zeros((5, 5))
    image[2, 2] = 1.0
    kernel = np.zeros((3, 3), dtype=np.uint8)
    kernel[2, 2] = 1  # offset (+1, +1) from the anchor: out[y, x] = image[y + 1, x + 1]
    out = draw.dilate(image, kernel)
    assert out[1, 1] == 1.0 and out.sum() == 1.0
    np.testing.assert_array_equal(draw.dilate(image, draw.disk(1)),
                                  ndimage.grey_dilation(image, footprint=draw.disk(1).astype(bool)))


def test_bytescale_and_paddle_patch():
    np.testing.assert_array_equal(draw.bytescale(np.array([0.0, 0.5, 2.0])), [0, 64, 255])
    line, mask, near = draw.paddle_patch(0.0, 5, 1.5, 2, 2)
    assert line.shape == mask.shape == (19, 19) and near.shape == (23, 23)
    assert line[9, 9:14].min() > 0.5 and line[:, :8].max() < 0.05  # drawn from the centre to the right
    assert mask.max() == 1.0 and (mask >= line).all()


# ---------------------------------------------------------------- the generated task

def small(**params):
    return registry.build_task("pathfinder", **{"n_train": 6, "n_val": 4, "n_test": 4, "workers": 1, **params})


def test_pathfinder_task_contract():
    task = small()
    assert (task.encoder, task.d_input, task.d_output, task.head, task.pooling, task.metric) == \
        ("linear", 1, 2, "classification", "mean", "accuracy")
    assert [len(task.split(k)) for k in ("train", "val", "test")] == [6, 4, 4]
    x, y = task.train[0]
    assert x.shape == (1024, 1) and x.dtype == torch.float32 and y.dtype == torch.int64
    images = task.train.images.float()  # (6, 1024)
    torch.testing.assert_close(torch.stack([task.train[i][0][:, 0] for i in range(6)]), images / 127.5 - 1)
    assert x.min() == -1 and x.max() == 1 and 0.05 < (x > -1).float().mean() < 0.9
    assert task.train.labels.tolist() == [1, 0, 1, 0, 1, 0] and task.test.labels.tolist() == [1, 0, 1, 0]
    xb, yb, lengths = task.collate([task.train[i] for i in range(3)])
    assert xb.shape == (3, 1024, 1) and lengths.tolist() == [1024] * 3 and yb.tolist() == [1, 0, 1]


def test_tokenized_pixels_are_grey_levels():
    task = small(tokenize=True)
    assert (task.encoder, task.d_input) == ("embedding", 256)
    xb, _, _ = task.collate([task.train[i] for i in range(2)])
    assert xb.dtype == torch.int64 and xb.shape == (2, 1024) and int(xb.max()) == 255
    torch.testing.assert_close(xb, task.train.images[:2].long())


def test_same_seed_same_bytes_other_seed_or_split_differs():
    a, b = small(), small()  # the second reads the cache; compare with a fresh draw too
    fresh, labels = pathfinder.draw_chunk((32, 14, 0, "train", 0, 6))
    assert torch.equal(a.train.images, b.train.images) and np.array_equal(a.train.images.numpy(), fresh)
    assert labels.tolist() == a.train.labels.tolist()
    assert not torch.equal(small(seed=1).train.images, a.train.images)
    assert not torch.equal(a.val.images, a.train.images[:4])
    prefix, _ = pathfinder.draw_chunk((32, 14, 0, "train", 0, 3))  # a smaller split is a prefix
    assert np.array_equal(prefix, fresh[:3])


def test_second_build_reads_the_cache(monkeypatch):
    first = small()

    def fail(job):
        raise AssertionError("drew images although the cache holds them")

    monkeypatch.setattr(pathfinder, "draw_chunk", fail)
    second = small()
    assert torch.equal(first.test.images, second.test.images)
    with pytest.raises(AssertionError, match="drew images"):
        small(seed=5)


@pytest.mark.parametrize("params, name", [
    (dict(resolution=48), "resolution"), (dict(resolution=True), "resolution"),
    (dict(contour_length=7), "contour_length"),
    (dict(n_train=0), "n_train"), (dict(n_val=2.5), "n_val"), (dict(seed=-1), "seed"), (dict(workers=0), "workers"),
    (dict(tokenize="yes"), "tokenize")])
def test_bad_parameters_are_rejected_before_any_work(params, name, monkeypatch):
    monkeypatch.setattr(pathfinder, "draw_chunk", None)  # nothing may be drawn
    with pytest.raises(ValueError, match=name):
        small(**params)


def test_pathx_is_128_by_128():
    task = registry.build_task("pathx", contour_length=6, n_train=2, n_val=2, n_test=2, workers=1)
    assert task.name == "pathx" and task.train[0][0].shape == (16384, 1) and task.params["resolution"] == 128
    assert registry.task_params("pathx")["contour_length"] == 14


def test_sources_and_show(tmp_path):
    for name in ("pathfinder", "pathx", "pathfinder_lra"):
        source = registry.SOURCES[name]
        assert source.available() is None and source.card == "docs/data/pathfinder.md"
    task = small()
    text = registry.SOURCES["pathfinder"].show(task, tmp_path / "pf.png")
    lines = text.splitlines()
    assert len(lines) == 3 and "label 1" in lines[0] and "label 0" in lines[1] and "ink" in lines[0]
    assert (tmp_path / "pf.png").stat().st_size > 5000


# ---------------------------------------------------------------- the LRA release reader

def write_release(root, n=12, size=32):
    """A tiny LRA folder: curv_contour_length_14 with a text metadata file (as released), a
    np.save metadata file (as snakes2 writes) and one empty image listed (the release has one)."""
    folder = root / "curv_contour_length_14"
    rng = np.random.default_rng(0)
    images, labels, text = [], [], []
    for k in range(n):
        sub = f"imgs/{k // 6}"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        img = (rng.random((size, size)) * 255).astype(np.uint8)
        from PIL import Image

        Image.fromarray(img, mode="L").save(folder / sub / f"sample_{k % 6}.png")
        images.append(img.reshape(-1))
        labels.append(k % 3 % 2)
        text.append([sub, f"sample_{k % 6}.png", str(k % 6), str(labels[-1]), "1.0", "14", "4", "2", "0.5", "1", "1"])
    (folder / "metadata").mkdir()
    (folder / "imgs/0/sample_9.png").write_bytes(b"")  # empty: skipped
    (folder / "metadata/0.npy").write_text("\n".join(" ".join(r) for r in text[:6]) + "\n"
                                           + "imgs/0 sample_9.png 9 1 1.0 14 4 2 0.5 1 1\n")
    np.save(folder / "metadata/1.npy", np.array(text[6:]))
    return folder, np.stack(images), np.array(labels)


def lra(root, **params):
    return registry.build_task("pathfinder_lra", **{"path": str(root), "workers": 1, **params})


def test_reader_reads_the_release_layout_in_metadata_order(tmp_path):
    _, images, labels = write_release(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 empty"):
        task = lra(tmp_path, split="ordered")
    assert [len(task.split(k)) for k in ("train", "val", "test")] == [9, 1, 2]  # 80/10/10 of 12, cut in order
    got = torch.cat([task.split(k).images for k in ("train", "val", "test")])
    assert np.array_equal(got.numpy(), images)
    assert torch.cat([task.split(k).labels for k in ("train", "val", "test")]).tolist() == labels.tolist()
    assert task.train[0][0].shape == (1024, 1)


def test_reader_random_split_is_s4s(tmp_path):
    _, images, _ = write_release(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = lra(tmp_path, split="random", seed=42)
    parts = torch.utils.data.random_split(range(12), [10, 1, 1], generator=torch.Generator().manual_seed(42))
    for split, part in zip(("train", "val", "test"), parts):
        assert np.array_equal(task.split(split).images.numpy(), images[list(part)])


def test_reader_cache_is_reused(tmp_path, monkeypatch):
    write_release(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = lra(tmp_path)
    monkeypatch.setattr(pathfinder, "read_metadata_images", None)  # reading again would fail
    with pytest.warns(UserWarning, match="skipped 1 empty"):  # repeated from the cache
        assert torch.equal(lra(tmp_path).train.images, first.train.images)


@pytest.mark.parametrize("damage, named", [
    (lambda f: (f / "imgs/1/sample_2.png").unlink(), "imgs/1/sample_2.png: image listed in the metadata is missing"),
    (lambda f: (f / "imgs/0/sample_3.png").write_bytes(b"\x89PNG\r\n\x1a\n trunc"),
     "imgs/0/sample_3.png: not a readable"),
    (lambda f: __import__("PIL.Image").Image.new("L", (16, 32)).save(f / "imgs/0/sample_1.png"),
     "imgs/0/sample_1.png: image is 16x32, expected 32x32"),
    (lambda f: (f / "metadata/0.npy").write_text("imgs/0 sample_0.png 0\n"), "metadata/0.npy: row 1"),
    (lambda f: (f / "metadata/0.npy").write_text("imgs/0 sample_0.png 0 2 x\n"), "metadata/0.npy: row 1"),
    (lambda f: (f / "metadata/x.npy").write_text(""), "metadata/x.npy: metadata file names must be <integer>.npy"),
])
def test_reader_errors_name_the_file(tmp_path, damage, named):
    folder, _, _ = write_release(tmp_path)
    damage(folder)
    with pytest.raises(cache.DataError, match=named.replace(".", r"\.")), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lra(tmp_path)


def test_reader_missing_folders(tmp_path):
    with pytest.raises(cache.DataError, match="curv_contour_length_9: no such folder"):
        lra(tmp_path, contour_length=9)
    (tmp_path / "curv_baseline").mkdir()
    with pytest.raises(cache.DataError, match="no metadata"):
        lra(tmp_path, contour_length=6)
    for params, name in ((dict(split="tfds"), "split"), (dict(resolution=0), "resolution"), (dict(path=None), "path")):
        with pytest.raises(ValueError, match=name):
            lra(tmp_path, **params)


# ---------------------------------------------------------------- slow: larger images, processes

@pytest.mark.slow
@pytest.mark.parametrize("resolution, contour_length, n", [(64, 14, 4), (128, 14, 4), (128, 9, 6)])
def test_larger_images_keep_the_contour_properties(resolution, contour_length, n):
    s, exs = examples(resolution, contour_length, n)
    for e in exs:
        assert e["image"].shape == (resolution, resolution) and e["image"].max() == 255
        for snake in e["snakes"][:2]:
            ink = snakes.contour_ink(snake, s, e["image"].shape)
            region = ndimage.binary_dilation(ink > 0.2 * ink.max(), draw.disk(e["margin"] + 1).astype(bool))
            assert ndimage.label(region, EIGHT)[1] == 1 and same_region(region, snake.tail, snake.head)
        c0, c1 = e["contours"]
        assert (c0 == c1) == bool(e["label"]) and all(e["image"][tuple(x)] >= 200 for x in e["ends"])


@pytest.mark.slow
def test_the_images_do_not_depend_on_the_number_of_workers():
    n = pathfinder.CHUNK + 3  # two chunks
    one = pathfinder.generated_split(32, 6, "val", n, 3, workers=1)
    cache.force_rebuild(True)
    try:
        two = pathfinder.generated_split(32, 6, "val", n, 3, workers=2)
    finally:
        cache.force_rebuild(False)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
