"""SC-synthetic (espeak-ng words) and the Speech Commands v2 folder reader."""
import shutil
import wave

import numpy as np
import pytest
import torch

from diagssm.tasks import audio, cache, speech
from diagssm.tasks.registry import SOURCES, build_task

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")
TINY = dict(words=["yes", "no", "left"], n_train=2, n_val=1, n_test=2, accents=["en-us", "en-gb"],
            variants=["m1", "f2"], workers=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SC-synthetic task (3 words, 4 voices: 2 train, 1 val, 1 test), built in its own cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIAGSSM_CACHE", str(tmp_path_factory.mktemp("speech_cache")))
        return build_task("sc_synthetic", **TINY)


@needs_espeak
def test_clips_are_float32_one_second_at_16khz(tiny):
    assert (tiny.d_input, tiny.d_output, tiny.encoder, tiny.head, tiny.pooling, tiny.metric) == (
        1, 3, "linear", "classification", "mean", "accuracy")
    assert [len(tiny.train), len(tiny.val), len(tiny.test)] == [6, 3, 6]
    x, y = tiny.train[0]
    assert x.shape == (16000, 1) and x.dtype == torch.float32 and y.dtype == torch.int64
    xb, yb, lengths = tiny.collate([tiny.train[i] for i in range(4)])
    assert xb.shape == (4, 16000, 1) and lengths.tolist() == [16000] * 4 and yb.tolist() == [0, 1, 2, 0]
    assert tiny.train.q.dtype == torch.int16 and tiny.train.rate == 16000
    meta = tiny.train.meta
    assert (meta["offset"] >= 0).all() and (meta["offset"] + meta["n_word"] <= 16000).all()
    assert (meta["n_word"] > 0.15 * 16000).all() and (meta["n_word"] < 0.9 * 16000).all()  # a word, not silence


@needs_espeak
def test_no_voice_is_in_two_splits_and_labels_are_balanced(tiny):
    used = {}
    for split in ("train", "val", "test"):
        ds = tiny.split(split)
        used[split] = {ds.meta["voices"][int(v)] for v in ds.meta["voice"]}
        assert torch.bincount(ds.y, minlength=3).tolist() == [len(ds) // 3] * 3
    assert used["train"] == {"en-us+m1", "en-gb+f2", "en-us+f2", "en-gb+m1"} - used["val"] - used["test"]
    assert len(used["train"]) == 2 and len(used["val"]) == 1 and len(used["test"]) == 1
    assert not (used["train"] & used["val"] or used["train"] & used["test"] or used["val"] & used["test"])


def test_voice_splits_of_the_full_set_are_disjoint_and_cover_every_variant():
    splits = speech.voice_splits(list(speech.ACCENTS), list(speech.VARIANTS), seed=0)
    sizes = {s: len(v) for s, v in splits.items()}
    assert sizes == {"train": 134, "val": 29, "test": 29}
    every = splits["train"] + splits["val"] + splits["test"]
    assert len(set(every)) == 192 == len(speech.ACCENTS) * len(speech.VARIANTS)
    for split in ("val", "test"):
        assert {v.split("+")[1] for v in splits[split]} == set(speech.VARIANTS)
    assert speech.voice_splits(list(speech.ACCENTS), list(speech.VARIANTS), seed=0) == splits
    assert speech.voice_splits(list(speech.ACCENTS), list(speech.VARIANTS), seed=1)["test"] != splits["test"]


@needs_espeak
def test_same_seed_same_bytes_other_seed_other_clips(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DIAGSSM_CACHE", str(tmp_path / "again"))  # build anew, not from the cache
    again = build_task("sc_synthetic", **TINY)
    for split in ("train", "val", "test"):
        a, b = tiny.split(split), again.split(split)
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and torch.equal(a.y, b.y)
    other = build_task("sc_synthetic", **TINY | {"n_train": 1, "n_val": 1, "n_test": 1, "seed": 1})
    assert not torch.equal(other.train.q, tiny.train.q[:3])
    assert other.train.meta["speed"].tolist() != tiny.train.meta["speed"][:3].tolist()


@needs_espeak
def test_the_8khz_test_copy_is_the_16khz_test_clips_resampled(tiny):
    half = build_task("sc_synthetic", **TINY | {"test_rate": 8000})
    assert half.test.q.shape == (6, 8000) and half.test.rate == 8000 and half.test[0][0].shape == (8000, 1)
    assert torch.equal(half.train.q, tiny.train.q) and torch.equal(half.val.q, tiny.val.q)
    assert torch.equal(half.test.y, tiny.test.y)
    expected = audio.resample(tiny.test.waveforms().double().numpy(), 16000, 8000)  # (6, 8000)
    got = half.test.waveforms().double().numpy()
    tolerance = half.test.scale.double().numpy()[:, None] * 0.5 + 1e-7  # int16 rounding of the copy
    assert (np.abs(got - expected) <= tolerance).all()
    assert np.abs(expected).max() > 0.05


@needs_espeak
def test_gain_and_snr_ranges(tiny):
    for split in ("train", "val", "test"):
        ds = tiny.split(split)
        meta = ds.meta
        assert ((meta["gain_db"] >= -20) & (meta["gain_db"] <= 0)).all()
        assert ((meta["snr_db"] >= 10) & (meta["snr_db"] <= 30)).all()
        assert ((meta["speed"] >= 120) & (meta["speed"] <= 220)).all()
        x = ds.waveforms()  # (n, L)
        for i in range(len(ds)):  # the word's peak is the drawn gain (to int16 rounding)
            o, n = int(meta["offset"][i]), int(meta["n_word"][i])
            peak_db = 20 * torch.log10(x[i, o:o + n].abs().max())
            assert abs(float(peak_db) - float(meta["gain_db"][i])) < 1e-3
            assert x[i, :o].abs().max() < x[i, o:o + n].abs().max()  # before the word: only noise


@needs_espeak
def test_render_clip_noise_before_the_word_is_at_the_snr():
    spec = dict(word="stop", label=0, voice="en-us+m3", speed=170, pitch=50, shift=1.0, drr_db=12.0,
                noise=0.0, seed=7, snr_db=20.0, gain_db=-6.0, rt60=0.1)
    x, offset, n_word = speech.render_clip(spec)
    assert offset + n_word == 16000 and offset > 6000  # shift 1: the word ends the clip
    speech_power = np.mean(x[offset:] ** 2)  # the word with its reverb and the noise
    noise_power = np.mean(x[:offset] ** 2)  # white noise only
    assert abs(10 * np.log10(speech_power / noise_power) - 20.0) < 0.6
    assert abs(20 * np.log10(np.abs(x[offset:]).max()) + 6.0) < 1e-9


def test_parameters_are_checked_before_any_work(monkeypatch):
    monkeypatch.setattr(speech, "_build", lambda *a: pytest.fail("built"))
    bad = [({"words": 12}, r"words=12 must be 10, 35 or a list"),
           ({"words": ["yes"]}, r"words=\['yes'\] must be 10, 35"),
           ({"words": ["yes", "maybe"]}, r"words=\['yes', 'maybe'\]"),
           ({"words": [True, False, "up"]}, r"words=\[True, False, 'up'\] .*YAML reads yes, no, on and off unquoted"),
           ({"n_train": 0}, r"n_train=0 must be an int >= 1"),
           ({"accents": ["en-xx"]}, r"accents=\['en-xx'\] must be a list of distinct names from: en-us"),
           ({"variants": ["m1", "m1"]}, r"variants=\['m1', 'm1'\]"),
           ({"accents": ["en-us"], "variants": ["m1", "f1"]}, r"make 2 voices; at least 3"),
           ({"speed": [220, 120]}, r"speed=\[220, 120\] must be \[min, max\] with 80 <= min <= max <= 450"),
           ({"snr_db": "loud"}, r"snr_db='loud'"),
           ({"rt60": [0.1, 5.0]}, r"rt60=\[0.1, 5.0\]"),
           ({"test_rate": 44100}, r"test_rate=44100 must be an int in \[1000, 16000\]"),
           ({"workers": 0}, r"workers=0 must be an int >= 1"),
           ({"seed": -1}, r"seed=-1 must be an int >= 0")]
    for params, message in bad:
        with pytest.raises(ValueError, match=message):
            build_task("sc_synthetic", **params)


@needs_espeak
def test_second_build_reads_the_cache(tmp_path, monkeypatch):
    params = TINY | {"words": ["up", "down"], "n_train": 1, "n_val": 1, "n_test": 1}
    first = build_task("sc_synthetic", **params)
    assert len(list(cache.cache_dir().glob("sc_synthetic-v1-*.pt"))) == 1
    monkeypatch.setattr(speech, "_build", lambda *a: pytest.fail("rebuilt instead of reading the cache"))
    second = build_task("sc_synthetic", **params | {"workers": 2, "test_rate": 8000})  # same data
    assert torch.equal(first.train.q, second.train.q)


def test_source_reports_a_missing_espeak(monkeypatch):
    assert SOURCES["sc_synthetic"].kind == "generated"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert SOURCES["sc_synthetic"].available() == "espeak-ng is not installed (apt-get install espeak-ng)"
    with pytest.raises(audio.SynthesisError, match="espeak-ng is not installed"):
        build_task("sc_synthetic", **TINY)


@needs_espeak
def test_show_prints_words_and_saves_waveform_and_spectrogram(tiny, tmp_path):
    text = SOURCES["sc_synthetic"].show(tiny, tmp_path / "sc.png")
    lines = text.splitlines()
    assert len(lines) == 6 and lines[0].startswith("0: 'yes' by ") and "s in a 1.00 s clip" in lines[0]
    assert (tmp_path / "sc.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@needs_espeak
def test_a_build_in_two_processes_gives_the_same_bytes(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DIAGSSM_CACHE", str(tmp_path))
    two = build_task("sc_synthetic", **TINY | {"workers": 2})
    for split in ("train", "val", "test"):
        assert torch.equal(two.split(split).q, tiny.split(split).q)


# ---------------------------------------------------------------- Speech Commands v2 folder
def write_wav(path, samples, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def clip(k, n):
    return (np.sin(np.arange(n) * (0.01 + 0.003 * k)) * 1000 * (k + 1)).astype(np.int16)


def write_folder(root):
    """The 10 command words, 3 clips each (one 17000 samples long, one 8000), plus a "cat"
    folder and background noise; validation and testing lists (with a "cat" entry each)."""
    for k, word in enumerate(speech.WORDS35[:10] + ("cat",)):
        for j, n in enumerate((16000, 17000, 8000)):
            write_wav(root / word / f"{k:02d}ab{j}_nohash_{j}.wav", clip(k, n))
    write_wav(root / "_background_noise_" / "white_noise.wav", clip(0, 20000))
    (root / "validation_list.txt").write_text("yes/00ab1_nohash_1.wav\ngo/09ab0_nohash_0.wav\ncat/10ab0_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("no/01ab2_nohash_2.wav\ncat/10ab1_nohash_1.wav\n")


def test_reader_follows_the_lists_and_pads_or_cuts_to_one_second(tmp_path):
    write_folder(tmp_path)
    task = build_task("speech_commands", path=str(tmp_path), words=10)
    assert (len(task.train), len(task.val), len(task.test)) == (27, 2, 1)
    assert task.val.meta["files"] == ["yes/00ab1_nohash_1.wav", "go/09ab0_nohash_0.wav"]
    assert task.test.meta["files"] == ["no/01ab2_nohash_2.wav"] and task.test.y.tolist() == [1]
    assert task.val.y.tolist() == [0, 9] and task.d_output == 10 and task.encoder == "linear"
    assert torch.bincount(task.train.y).tolist() == [2, 2] + [3] * 7 + [2]
    x, _ = task.val[0]  # 17000 samples cut to 16000
    assert x.shape == (16000, 1) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0], torch.from_numpy(clip(0, 17000)[:16000]).float() / 32768)
    x, _ = task.test[0]  # 8000 samples padded with zeros
    torch.testing.assert_close(x[:8000, 0], torch.from_numpy(clip(1, 8000)).float() / 32768)
    assert not x[8000:].any() and task.test.meta["n_samples"].tolist() == [8000]
    assert all("cat" not in f and "noise" not in f for f in task.train.meta["files"])
    half = build_task("speech_commands", path=str(tmp_path), words=10, test_rate=8000)
    assert half.test.q.shape == (1, 8000) and half.train.q.shape == (27, 16000)
    three = build_task("speech_commands", path=str(tmp_path), words=["yes", "no", "cat"])
    assert (len(three.train), len(three.val), len(three.test)) == (5, 2, 2) and three.test.y.tolist() == [1, 2]


def test_reader_reads_the_cache_the_second_time_and_shows_clips(tmp_path, monkeypatch):
    write_folder(tmp_path / "sc")
    first = build_task("speech_commands", path=str(tmp_path / "sc"))
    monkeypatch.setattr(speech, "read_folder", lambda *a: pytest.fail("read again instead of the cache"))
    second = build_task("speech_commands", path=str(tmp_path / "sc"))
    assert torch.equal(first.train.q, second.train.q)
    text = SOURCES["speech_commands"].show(second, tmp_path / "sc.png")
    assert text.splitlines()[0] == "0: 'yes' yes/00ab0_nohash_0.wav (1.00 s)"
    assert (tmp_path / "sc.png").stat().st_size > 1000


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "testing_list.txt").unlink(),
     r"testing_list.txt: missing \(expected the Speech Commands v2 list file\)"),
    (lambda r: shutil.rmtree(r / "stop"),
     r"stop: missing \(expected the Speech Commands v2 folder of the word's clips\)"),
    (lambda r: (r / "up" / "02ab0_nohash_0.wav").write_text("RIFF but not really"),
     r"up/02ab0_nohash_0.wav: not a readable WAV"),
    (lambda r: (r / "up" / "02ab1_nohash_1.wav").write_bytes((r / "up" / "02ab1_nohash_1.wav").read_bytes()[:-100]),
     r"up/02ab1_nohash_1.wav: truncated WAV: the header says 17000 samples, the file holds 16950"),
    (lambda r: write_wav(r / "left" / "04ab0_nohash_0.wav", clip(0, 8000), rate=8000),
     r"left/04ab0_nohash_0.wav: sample rate 8000 Hz; Speech Commands clips are 16000 Hz"),
    (lambda r: (r / "yes" / "00ab1_nohash_1.wav").unlink(),
     r"yes/00ab1_nohash_1.wav: listed in .*validation_list.txt but does not exist"),
])
def test_reader_names_the_bad_file(tmp_path, damage, message):
    write_folder(tmp_path)
    damage(tmp_path)
    with pytest.raises(cache.DataError, match=message):
        build_task("speech_commands", path=str(tmp_path))


def test_reader_parameters(tmp_path):
    with pytest.raises(ValueError, match="path=None: give the Speech Commands v2 folder"):
        build_task("speech_commands")
    with pytest.raises(cache.DataError, match="nowhere: no such folder"):
        build_task("speech_commands", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="words=12"):
        build_task("speech_commands", path=str(tmp_path), words=12)
    with pytest.raises(ValueError, match="test_rate=0"):
        build_task("speech_commands", path=str(tmp_path), test_rate=0)
    assert SOURCES["speech_commands"].kind == "files" and SOURCES["speech_commands"].available() is None
