"""SC-synthetic: spoken command words made with espeak-ng, and a reader of Speech Commands v2.

"sc_synthetic" (generated here; not Speech Commands) is a stand-in for the Speech Commands task
of S4 (Gu et al. 2022), S4D and S5 (Smith et al. 2023, whose zero-shot test trains at 16 kHz and
tests at 8 kHz): the words of Speech Commands v2 (Warden 2018), 10 or 35 classes, spoken by the
espeak-ng formant synthesiser. A *voice* is an accent (an espeak-ng language voice, `ACCENTS`)
combined with a voice variant (`VARIANTS`: male, female, croaking, whispering, klatt); voices are
dealt to train / val / test (70/15/15%, at least one each) so that no voice is in two splits.
Each clip: the word at a random speed and pitch, its silence trimmed (-40 dB of the peak),
resampled 22050 -> 16000 Hz (`audio.resample`), peak-normalised, placed at a random offset of a
1 s clip (L = 16000; longer words are cut), convolved with a short reverb `audio.reverb_ir`,
mixed with white, pink or brown noise at a random SNR, and scaled by a random gain. Clips are
stored as int16 with a scale each and read as float32 (L, 1).

`test_rate` (default 16000): the test split resampled to that rate (8000: the 8 kHz copy for
the zero-shot sampling-rate test; the clips are the 16 kHz test clips resampled, L = 8000).
Train and val stay at 16 kHz. The data card is docs/data/speech.md.

"speech_commands" reads the real Speech Commands v2 folder (Warden 2018, arXiv:1804.03209):
<path>/<word>/<speaker hash>_nohash_<n>.wav, 16 kHz 16-bit mono; validation_list.txt and
testing_list.txt name the val and test files (paths relative to <path>); every other file of the
chosen words' folders is train; _background_noise_/ and the other words' folders are not read.
words=10 keeps the 10 command words only (10 classes, the words of the S4 papers' "SC10"; no
"unknown" or "silence" class), words=35 all 35 words (S4's and S5's 35-class task). Clips are padded
with zeros at the end or cut to 16000 samples. The S4 code's SC10 split, normalisation and
half-rate test differ (docs/data/speech.md, "Against the S4 code's loader").
"""
import shutil
from pathlib import Path

import numpy as np
import torch

from diagssm.tasks import audio, cache
from diagssm.tasks.base import SPLITS, Source, Task, check_int, pad_collate

RATE, L = 16000, 16000
VERSION = 1
WORDS10 = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
WORDS35 = WORDS10 + ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "bed",
                     "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow", "backward",
                     "forward", "follow", "learn", "visual")
LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc", "de", "fr", "es", "nl")  # the last four speak the English words with their own phonology
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "whisper",
            "whisperf", "klatt")
VOICE_FRACTIONS = {"val": 0.15, "test": 0.15}
RANGES = {"speed": (80, 450), "pitch": (0, 99), "snr_db": (-20, 80), "gain_db": (-60, 20), "rt60": (0.01, 2.0)}
NOISE_EXPONENTS = (0.0, 1.0, 2.0)  # white, pink, brown


def check_words(words):
    """words=10, 35 or a list of distinct words of WORDS35 (at least 2) -> the list of class names."""
    if isinstance(words, int) and not isinstance(words, bool) and words in (10, 35):
        return list(WORDS10 if words == 10 else WORDS35)
    if (isinstance(words, (list, tuple)) and len(words) >= 2 and len(set(words)) == len(words)
            and all(w in WORDS35 for w in words)):
        return list(words)
    hint = ""
    if isinstance(words, (list, tuple)) and any(isinstance(w, bool) for w in words):
        hint = " (YAML reads yes, no, on and off unquoted as true/false: quote them, e.g. ['yes', 'no'])"
    raise ValueError(f"words={words!r} must be 10, 35 or a list of at least 2 distinct words from: "
                     f"{' '.join(WORDS35)}{hint}")


def check_rate(test_rate):
    if not isinstance(test_rate, int) or isinstance(test_rate, bool) or not 1000 <= test_rate <= RATE:
        raise ValueError(f"test_rate={test_rate!r} must be an int in [1000, {RATE}] Hz (8000: the 8 kHz copy)")


def _check_range(name, value):
    low, high = RANGES[name]
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name}={value!r} must be [min, max] with {low} <= min <= max <= {high}")
    return [float(v) for v in value]


def _check_names(name, value, allowed):
    if value is None:
        return list(allowed)
    if not isinstance(value, (list, tuple)) or not value or len(set(value)) != len(value) or any(
            v not in allowed for v in value):
        raise ValueError(f"{name}={value!r} must be a list of distinct names from: {', '.join(allowed)}")
    return list(value)


def voice_splits(accents, variants, seed):
    """{split: [voice, ...]} with voice = "accent+variant"; every voice in exactly one split.

    Stratified by variant: each variant's accents are shuffled, then voices are dealt row by row
    over the (shuffled) variants, so the first test and val voices cover distinct variants.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C, 1]))
    columns = [[f"{accents[a]}+{v}" for a in rng.permutation(len(accents))] for v in variants]
    order = [columns[v][r] for r in range(len(accents)) for v in rng.permutation(len(variants))]
    n = len(order)
    n_test = max(1, round(VOICE_FRACTIONS["test"] * n))
    n_val = max(1, round(VOICE_FRACTIONS["val"] * n))
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


def clip_specs(words, voices, n_per_word, ranges, seed, split):
    """The parameters of each clip of a split: n_per_word clips per word (labels interleaved:
    clip c has label c % len(words)), each word cycling through its own shuffle of `voices`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C, 2, SPLITS.index(split)]))
    perms = [rng.permutation(len(voices)) for _ in words]
    specs = []
    for i in range(n_per_word):
        for w, word in enumerate(words):
            u = {k: rng.uniform(*ranges[k]) for k in ("snr_db", "gain_db", "rt60")}
            specs.append(dict(
                word=word, label=w, voice=voices[perms[w][i % len(voices)]],
                speed=int(rng.integers(ranges["speed"][0], ranges["speed"][1] + 1)),
                pitch=int(rng.integers(ranges["pitch"][0], ranges["pitch"][1] + 1)),
                shift=float(rng.uniform()), drr_db=float(rng.uniform(6.0, 20.0)),
                noise=float(NOISE_EXPONENTS[rng.integers(len(NOISE_EXPONENTS))]),
                seed=int(rng.integers(2 ** 63)), **{k: float(v) for k, v in u.items()}))
    return specs


def render_clip(spec):
    """One clip from its spec (module docstring). Returns (x, offset, n_word): x (L,) float64;
    the word (trimmed, before reverb; at most L samples) sits at x[offset:offset + n_word]."""
    rng = np.random.default_rng(spec["seed"])
    rate, samples = audio.espeak(spec["word"], spec["voice"], spec["speed"], spec["pitch"])
    start, stop = audio.active_span(samples)
    word = audio.resample(samples[start:stop] / 32768.0, rate, RATE)  # (n_word,)
    word = word[:L] / np.abs(word).max()
    offset = min(int(spec["shift"] * (L - len(word) + 1)), L - len(word))  # shift in [0, 1]
    x = np.zeros(L)
    x[offset:offset + len(word)] = word
    x = audio.convolve(x, audio.reverb_ir(spec["rt60"], spec["drr_db"], RATE, rng))  # (L,)
    noise = audio.colored_noise(L, spec["noise"], rng)  # (L,)
    x = audio.add_noise_at_snr(x, noise, (offset, offset + len(word)), spec["snr_db"])
    x *= 10 ** (spec["gain_db"] / 20) / np.abs(x[offset:offset + len(word)]).max()
    return x, offset, len(word)


def render_chunk(specs):
    """render_clip over a list of specs, quantized: q (k, L) int16, scale (k,), offset (k,), n_word (k,)."""
    xs, offsets, n_words = zip(*(render_clip(s) for s in specs))
    q, scale = audio.quantize(np.stack(xs))
    return q, scale, np.array(offsets, dtype=np.int16), np.array(n_words, dtype=np.int16)


def build_split(specs, voices, workers, desc):
    """Render a split's clips (in processes) into the cache dict of one split."""
    chunks = [specs[i:i + 32] for i in range(0, len(specs), 32)]
    parts = cache.parallel_map(render_chunk, chunks, workers, desc=desc)
    q, scale, offset, n_word = (np.concatenate(p) for p in zip(*parts))
    voice_id = [voices.index(s["voice"]) for s in specs]
    return {"q": torch.from_numpy(q), "scale": torch.from_numpy(scale),
            "y": torch.tensor([s["label"] for s in specs], dtype=torch.int64),
            "offset": torch.from_numpy(offset), "n_word": torch.from_numpy(n_word),
            "voice": torch.tensor(voice_id, dtype=torch.int16),
            "speed": torch.tensor([s["speed"] for s in specs], dtype=torch.int16),
            "pitch": torch.tensor([s["pitch"] for s in specs], dtype=torch.int16),
            "snr_db": torch.tensor([s["snr_db"] for s in specs], dtype=torch.float32),
            "gain_db": torch.tensor([s["gain_db"] for s in specs], dtype=torch.float32)}


META = ("offset", "n_word", "voice", "speed", "pitch", "snr_db", "gain_db")


def sc_synthetic_task(words=10, n_train=300, n_val=50, n_test=50, accents=None, variants=None,
                      speed=(120, 220), pitch=(20, 80), snr_db=(10, 30), gain_db=(-20, 0), rt60=(0.05, 0.3),
                      test_rate=16000, workers=None, seed=0):
    """SC-synthetic (module docstring): 1 s clips of spoken words, L = 16000 at 16 kHz.

    words: 10 (yes no up down left right on off stop go), 35 (all of Speech Commands v2) or a
        list of some of those 35. n_train, n_val, n_test: clips per word in each split.
    accents, variants: subsets of ACCENTS, VARIANTS (default all: 12 x 16 = 192 voices; at
        least 3 voices, as each split needs its own). speed (words per minute), pitch (espeak-ng
        0-99), snr_db, gain_db (the word's peak, dB re full scale), rt60 (reverb decay, seconds):
        [min, max] ranges drawn uniformly per clip. test_rate: see the module docstring.
        workers: processes for the build (default: CPU count, at most 8; not part of the data).

    Shapes: items x (L, 1) float32 (L = 16000; in test, L = test_rate), y () int64
    """
    words = check_words(words)
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        check_int(name, value, 1)
    accents, variants = _check_names("accents", accents, ACCENTS), _check_names("variants", variants, VARIANTS)
    if len(accents) * len(variants) < 3:
        raise ValueError(f"accents={accents} x variants={variants} make {len(accents) * len(variants)} voices; "
                         f"at least 3 are needed (each split has its own voices)")
    ranges = {k: _check_range(k, v) for k, v in (("speed", speed), ("pitch", pitch), ("snr_db", snr_db),
                                                    ("gain_db", gain_db), ("rt60", rt60))}
    check_rate(test_rate)
    if workers is not None:
        check_int("workers", workers, 1)
    check_int("seed", seed, 0)
    params = dict(words=words, n_train=n_train, n_val=n_val, n_test=n_test, accents=accents, variants=variants,
                  **ranges, seed=seed)
    data = cache.cached("sc_synthetic", params, lambda: _build(params, workers), VERSION)
    splits = {s: audio.AudioDataset(data[s]["q"], data[s]["scale"], data[s]["y"], words, RATE,
                                    {k: data[s][k] for k in META} | {"voices": data[s]["voices"]})
              for s in SPLITS}
    if test_rate != RATE:
        splits["test"] = splits["test"].resampled(test_rate)
    return Task("sc_synthetic", **splits, d_input=1, d_output=len(words), encoder="linear",
                head="classification", pooling="mean", metric="accuracy", collate=pad_collate,
                params=params | {"test_rate": test_rate, "workers": workers})


def _build(params, workers):
    if shutil.which(audio.ESPEAK) is None:
        raise audio.SynthesisError(espeak_missing())
    voices = voice_splits(params["accents"], params["variants"], params["seed"])
    n = {"train": params["n_train"], "val": params["n_val"], "test": params["n_test"]}
    data = {}
    for split in SPLITS:
        specs = clip_specs(params["words"], voices[split], n[split], params, params["seed"], split)
        data[split] = build_split(specs, voices[split], workers, desc=f"sc_synthetic {split}")
        data[split]["voices"] = voices[split]
    return data


def espeak_missing():
    """None if espeak-ng is on the PATH, else the reason sc_synthetic cannot be built."""
    if shutil.which(audio.ESPEAK) is None:
        return "espeak-ng is not installed (apt-get install espeak-ng)"
    return None


def show_spoken(task, png_path):
    """A few training clips (word, voice, speed, spoken duration) as text; the first clip's
    waveform and spectrogram saved to png_path."""
    ds, meta = task.train, task.train.meta
    lines = []
    for i in range(min(6, len(ds))):
        lines.append(f"{i}: {ds.classes[int(ds.y[i])]!r} by {meta['voices'][int(meta['voice'][i])]}, "
                     f"{int(meta['speed'][i])} wpm, pitch {int(meta['pitch'][i])}: word "
                     f"{int(meta['n_word'][i]) / ds.rate:.2f} s in a {ds.q.shape[1] / ds.rate:.2f} s clip, "
                     f"SNR {float(meta['snr_db'][i]):.1f} dB, gain {float(meta['gain_db'][i]):.1f} dB")
    audio.plot_clip(ds, 0, png_path, f"SC-synthetic: {lines[0][3:]}")
    return "\n".join(lines)


# ---------------------------------------------------------------- Speech Commands v2 reader
def speech_commands_task(path=None, words=10, test_rate=16000, seed=0):
    """The Speech Commands v2 folder at `path` (module docstring); words=10 or 35 (or a list);
    test_rate as for sc_synthetic. `seed` is unused (the splits are the published lists).

    Shapes: items x (L, 1) float32 (L = 16000; in test, L = test_rate), y () int64
    """
    words = check_words(words)
    check_rate(test_rate)
    check_int("seed", seed, 0)
    if path is None:
        raise ValueError("path=None: give the Speech Commands v2 folder (the one holding validation_list.txt)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise cache.DataError(f"{root}: no such folder (expected the Speech Commands v2 folder)")
    stamps = {name: cache.file_stamp(_must_exist(root / name, "list file")) for name in LISTS.values()}
    stamps.update({w: cache.file_stamp(_must_exist(root / w, "folder of the word's clips")) for w in words})
    params = dict(path=str(root.resolve()), stamps=stamps, words=words)
    data = cache.cached("speech_commands", params, lambda: read_folder(root, words), VERSION)
    splits = {s: audio.AudioDataset(data[s]["q"], data[s]["scale"], data[s]["y"], words, RATE,
                                    {"n_samples": data[s]["n_samples"], "files": data[s]["files"]})
              for s in SPLITS}
    if test_rate != RATE:
        splits["test"] = splits["test"].resampled(test_rate)
    return Task("speech_commands", **splits, d_input=1, d_output=len(words), encoder="linear",
                head="classification", pooling="mean", metric="accuracy", collate=pad_collate,
                params=dict(path=str(root), words=words, test_rate=test_rate, seed=seed))


def _must_exist(path, what):
    if not path.exists():
        raise cache.DataError(f"{path}: missing (expected the Speech Commands v2 {what})")
    return path


def split_files(root, words):
    """{split: [relative path, ...]} from the two list files and the word folders."""
    listed = {}
    for split, name in LISTS.items():
        entries = [e.strip() for e in (root / name).read_text().splitlines() if e.strip()]
        for e in entries:
            if e.split("/")[0] in words and not (root / e).is_file():
                raise cache.DataError(f"{root / e}: listed in {root / name} but does not exist")
        listed[split] = {e for e in entries if e.split("/")[0] in words}
    both = listed["val"] & listed["test"]
    if both:
        raise cache.DataError(f"{root}: {sorted(both)[0]} is in both {LISTS['val']} and {LISTS['test']}")
    files = {s: [] for s in SPLITS}
    for w in words:
        for f in sorted((root / w).glob("*.wav")):
            rel = f"{w}/{f.name}"
            files["val" if rel in listed["val"] else "test" if rel in listed["test"] else "train"].append(rel)
    return files


def read_folder(root, words):
    """The cache dict of the three splits: clips padded or cut to L, their original lengths."""
    data = {}
    for split, rels in split_files(root, words).items():
        q = np.zeros((len(rels), L), dtype=np.int16)
        n_samples = np.zeros(len(rels), dtype=np.int32)
        for i, rel in enumerate(cache.progress(rels, total=len(rels), desc=f"speech_commands {split}")):
            rate, x = audio.read_wav(root / rel)
            if rate != RATE:
                raise cache.DataError(f"{root / rel}: sample rate {rate} Hz; Speech Commands clips are {RATE} Hz")
            q[i, :min(len(x), L)] = x[:L]
            n_samples[i] = len(x)
        data[split] = {"q": torch.from_numpy(q), "scale": torch.full((len(rels),), 1 / 32768),
                       "y": torch.tensor([words.index(r.split("/")[0]) for r in rels], dtype=torch.int64),
                       "n_samples": torch.from_numpy(n_samples), "files": rels}
    return data


def show_files(task, png_path):
    """A few training clips (word, file, duration) as text; the first one's waveform and
    spectrogram saved to png_path."""
    ds = task.train
    lines = [f"{i}: {ds.classes[int(ds.y[i])]!r} {ds.meta['files'][i]} ({int(ds.meta['n_samples'][i]) / ds.rate:.2f} s)"
             for i in range(min(6, len(ds)))]
    audio.plot_clip(ds, 0, png_path, f"Speech Commands v2: {lines[0][3:]}")
    return "\n".join(lines)


TASKS = {"sc_synthetic": sc_synthetic_task, "speech_commands": speech_commands_task}
SOURCES = {
    "sc_synthetic": Source("generated", "espeak-ng speaking the Speech Commands words, with noise and reverb "
                           "(SC-synthetic, not Speech Commands)", "docs/data/speech.md",
                           available=espeak_missing, show=show_spoken),
    # available() cannot see the task's path; speech_commands_task checks the folder itself.
    "speech_commands": Source("files", "a Speech Commands v2 folder you have (Warden 2018; task param path)",
                              "docs/data/speech.md", show=show_files),
}
