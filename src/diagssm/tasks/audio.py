"""Audio helpers for the speech tasks: a windowed-sinc resampler, WAV reading, espeak-ng
synthesis, the augmentations of SC-synthetic and a dataset of compactly stored clips.

Resampling (`resample`) is band-limited interpolation with a Kaiser-windowed sinc (Smith, "Digital
Audio Resampling", ccrma.stanford.edu/~jos/resample): for a rational ratio new/orig = up/down
(reduced by their gcd), on the grid of rate orig * up = new * down,

    y[m] = up * sum_j x[j] h(m * down - j * up),   h(k) = 2 fc sinc(2 fc k) w_kaiser(k / K),

with cutoff fc = rolloff / (2 max(up, down)) cycles per grid sample (rolloff < 1 of the lower
Nyquist frequency) and half-width K = zeros / (2 fc) (`zeros` sinc zero crossings on each side).
The taps depend only on the phase m mod up, so they are tabulated once per ratio (polyphase).
Samples outside the signal are zeros; output m sits at time m / new, like scipy's resample_poly.
The defaults (zeros 32, rolloff 0.92, beta 9) put the stopband (about -90 dB) at and above the
new Nyquist frequency, so content that would alias is removed; the passband is flat to 0.85 of it.

Augmentations (`reverb_ir`, `colored_noise`, `add_noise_at_snr`) draw from a numpy Generator the
caller seeds, so a clip is a pure function of its parameters.
"""
import functools
import math
import subprocess
import wave
from io import BytesIO

import numpy as np
import torch
from torch.utils.data import Dataset

from diagssm.tasks.cache import DataError

ESPEAK = "espeak-ng"


class SynthesisError(RuntimeError):
    """espeak-ng is missing, failed, or wrote something that is not a 16-bit mono WAV."""


# ---------------------------------------------------------------- resampling
def _kaiser(t, beta):
    """Kaiser window on t in [-1, 1] (zero outside). Shapes: t (...) -> (...)"""
    inside = np.abs(t) <= 1
    arg = beta * np.sqrt(np.clip(1.0 - t * t, 0.0, None))  # (...)
    return np.where(inside, np.i0(arg) / np.i0(beta), 0.0)


@functools.lru_cache(maxsize=32)
def phase_table(orig, new, zeros=32, rolloff=0.92, beta=9.0):
    """(up, down, first, taps): output m reads inputs first[m % up] + (m // up) * down + t,
    t < T, weighted by taps[m % up, t]. Shapes: first (up,) int64, taps (up, T) float64"""
    g = math.gcd(orig, new)
    up, down = new // g, orig // g
    fc = rolloff * 0.5 / max(up, down)  # cycles per sample of the common grid
    K = zeros / (2 * fc)  # half-width of the filter on the grid
    T = int(math.floor(2 * K / up)) + 2
    t = np.arange(up, dtype=np.int64) * down  # (up,) grid position of outputs 0..up-1
    first = np.ceil((t - K) / up).astype(np.int64)  # (up,)
    k = t[:, None] - (first[:, None] + np.arange(T)) * up  # (up, T) grid offsets
    taps = up * 2 * fc * np.sinc(2 * fc * k) * _kaiser(k / K, beta)  # (up, T)
    return up, down, first, taps


def resample(x, orig, new, zeros=32, rolloff=0.92, beta=9.0):
    """`x` sampled at `orig` Hz resampled to `new` Hz (module docstring), along the last axis.

    Shapes: x (..., n) float -> (..., ceil(n * new / orig)) float64
    """
    for name, value in (("orig", orig), ("new", new)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a sample rate in Hz (an int >= 1)")
    x = np.asarray(x, dtype=np.float64)
    if orig == new:
        return x.copy()
    up, down, first, taps = phase_table(orig, new, zeros, rolloff, beta)
    n = x.shape[-1]
    M = -(-n * up // down)
    m = np.arange(M)  # (M,)
    p = m % up  # (M,) phase of each output
    idx = (first[p] + (m // up) * down)[:, None] + np.arange(taps.shape[1])  # (M, T)
    pad_left = max(0, -int(idx.min()))
    pad_right = max(0, int(idx.max()) + 1 - n)
    rows = x.reshape(-1, n)  # (R, n)
    rows = np.pad(rows, ((0, 0), (pad_left, pad_right)))  # (R, n + pads)
    w = taps[p]  # (M, T)
    out = np.empty((rows.shape[0], M))
    chunk = max(1, 2_000_000 // idx.size)
    for r in range(0, rows.shape[0], chunk):
        out[r:r + chunk] = np.einsum("rmt,mt->rm", rows[r:r + chunk][:, idx + pad_left], w)  # (r, M)
    return out.reshape(*x.shape[:-1], M)


# ---------------------------------------------------------------- WAV files and espeak-ng
def _wav_frames(f, source, streamed):
    """(rate, int16 samples) of an open wave reader; `streamed`: the header's length may be a
    placeholder (espeak-ng --stdout), so take what is there."""
    rate, width, channels, n = f.getframerate(), f.getsampwidth(), f.getnchannels(), f.getnframes()
    if width != 2 or channels != 1:
        raise DataError(f"{source}: expected 16-bit mono PCM, got {8 * width}-bit with {channels} channels")
    data = f.readframes(n)
    if not streamed and len(data) < 2 * n:
        raise DataError(f"{source}: truncated WAV: the header says {n} samples, the file holds {len(data) // 2}")
    return rate, np.frombuffer(data[:len(data) // 2 * 2], dtype="<i2").astype(np.int16)


def read_wav(path):
    """(rate, samples) of a 16-bit mono PCM WAV file; DataError naming the file if it is missing,
    not a WAV file, not 16-bit mono, or shorter than its header says. Shapes: samples (n,) int16"""
    try:
        with wave.open(str(path), "rb") as f:
            return _wav_frames(f, path, streamed=False)
    except FileNotFoundError as err:
        raise DataError(f"{path}: no such file") from err
    except (wave.Error, EOFError) as err:
        raise DataError(f"{path}: not a readable WAV file ({type(err).__name__}: {err})") from err


def espeak(text, voice, speed, pitch):
    """`text` spoken by espeak-ng: (rate, samples), rate 22050 Hz. Runs the command
    `espeak-ng -v voice -s speed -p pitch --stdout text` (an argument list, no shell).
    Raises SynthesisError naming the command if it is missing or fails. Shapes: samples (n,) int16"""
    cmd = [ESPEAK, "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "--stdout", text]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    except FileNotFoundError as err:
        raise SynthesisError(f"{ESPEAK} is not installed (apt-get install espeak-ng); needed to run "
                             f"{' '.join(cmd)}") from err
    except subprocess.TimeoutExpired as err:
        raise SynthesisError(f"`{' '.join(cmd)}` did not finish in {err.timeout} s") from err
    if done.returncode != 0:
        raise SynthesisError(f"`{' '.join(cmd)}` failed with exit status {done.returncode}: "
                             f"{done.stderr.decode(errors='replace').strip()}")
    try:
        with wave.open(BytesIO(done.stdout), "rb") as f:
            rate, samples = _wav_frames(f, f"output of `{' '.join(cmd)}`", streamed=True)
    except (wave.Error, EOFError, DataError) as err:
        raise SynthesisError(f"`{' '.join(cmd)}` did not write a 16-bit mono WAV: {err}") from err
    if samples.size == 0 or not samples.any():
        raise SynthesisError(f"`{' '.join(cmd)}` wrote no sound")
    return rate, samples


def espeak_version():
    """espeak-ng's version line, e.g. 'eSpeak NG text-to-speech: 1.51 ...' (None if not installed)."""
    try:
        done = subprocess.run([ESPEAK, "--version"], capture_output=True, timeout=30, check=False)
    except FileNotFoundError:
        return None
    return done.stdout.decode(errors="replace").strip() if done.returncode == 0 else None


# ---------------------------------------------------------------- augmentations
def active_span(x, floor_db=-40.0):
    """(start, stop): the first and one past the last sample within floor_db of the peak."""
    loud = np.flatnonzero(np.abs(x) >= np.abs(x).max() * 10 ** (floor_db / 20))
    return int(loud[0]), int(loud[-1]) + 1


def reverb_ir(rt60, drr_db, rate, rng):
    """A room impulse response: a unit direct path, then exponentially decaying Gaussian noise
    that falls by 60 dB in rt60 seconds, with energy 10^(-drr_db / 10) of the direct path.

    Shapes: returns (ceil(rt60 * rate) + 1,) float64, ir[0] = 1
    """
    n = int(math.ceil(rt60 * rate))
    t = np.arange(1, n + 1)  # (n,)
    tail = rng.standard_normal(n) * np.exp(-math.log(1000.0) * t / (rt60 * rate))  # (n,) -60 dB at rt60
    tail *= math.sqrt(10 ** (-drr_db / 10) / np.sum(tail ** 2))
    return np.concatenate([[1.0], tail])


def convolve(x, h):
    """The first len(x) samples of the full linear convolution x * h (by FFT). Shapes: (n,), (k,) -> (n,)"""
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:len(x)]


def colored_noise(n, exponent, rng):
    """Unit-RMS Gaussian noise with power spectrum ~ 1 / f^exponent (0 white, 1 pink, 2 brown).

    Shapes: returns (n,) float64
    """
    spec = np.fft.rfft(rng.standard_normal(n))  # (n//2+1,)
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0  # keep the mean as drawn; it is removed below
    x = np.fft.irfft(spec / f ** (exponent / 2), n)  # (n,)
    x -= x.mean()
    return x / np.sqrt(np.mean(x ** 2))


def add_noise_at_snr(x, noise, span, snr_db):
    """x + a * noise with the speech-to-noise power ratio snr_db, speech power measured over
    x[span[0]:span[1]] (the word) and noise power over the whole clip. Shapes: (n,), (n,) -> (n,)"""
    speech_power = np.mean(x[span[0]:span[1]] ** 2)
    a = math.sqrt(speech_power / (np.mean(noise ** 2) * 10 ** (snr_db / 10)))
    return x + a * noise


def quantize(x):
    """(q, scale): int16 samples and a float32 scale per clip with x ~ q * scale (peak -> 32767).

    Shapes: x (n, L) float -> q (n, L) int16, scale (n,) float32
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    peak = np.abs(x).max(axis=1)  # (n,)
    scale = np.where(peak > 0, peak / 32767.0, 1.0).astype(np.float32)  # (n,)
    q = np.clip(np.round(x / scale[:, None].astype(np.float64)), -32767, 32767).astype(np.int16)  # (n, L)
    return q, scale


class AudioDataset(Dataset):
    """Clips stored as int16 with a float32 scale each; item i is (q[i] * scale[i] as (L, 1)
    float32, y[i]). `classes` names the labels; `meta` holds per-clip tensors (e.g. the voice).

    Shapes: q (n, L) int16, scale (n,) float32, y (n,) int64; item: x (L, 1) float32, y () int64
    """

    def __init__(self, q, scale, y, classes, rate, meta=None):
        if not (len(q) == len(scale) == len(y)):
            raise ValueError(f"q, scale and y must have the same length; got {len(q)}, {len(scale)}, {len(y)}")
        self.q, self.scale, self.y = torch.as_tensor(q), torch.as_tensor(scale), torch.as_tensor(y)
        self.classes, self.rate, self.meta = list(classes), int(rate), dict(meta or {})

    def __len__(self):
        return len(self.q)

    def __getitem__(self, i):
        return (self.q[i].float() * self.scale[i]).unsqueeze(-1), self.y[i]  # (L, 1), ()

    def waveforms(self):
        """All clips as float32. Shapes: (n, L)"""
        return self.q.float() * self.scale[:, None]

    def resampled(self, rate):
        """The same clips resampled to `rate` Hz (`resample`), re-quantized; meta kept."""
        q, scale = quantize(resample(self.waveforms().double().numpy(), self.rate, rate))
        return AudioDataset(q, scale, self.y, self.classes, rate, self.meta)


def spectrogram_db(x, rate, n_fft=512, hop=128):
    """Power spectrogram in dB re the clip's maximum (torch.stft, Hann window), with its time
    (s) and frequency (Hz) axes. Shapes: x (L,) -> S (n_fft//2+1, frames), times (frames,), freqs (n_fft//2+1,)"""
    x = torch.as_tensor(x, dtype=torch.float32)
    spec = torch.stft(x, n_fft, hop_length=hop, window=torch.hann_window(n_fft), return_complex=True)  # (F, T)
    power = spec.abs() ** 2  # (F, T)
    S = 10 * torch.log10(power / power.max().clamp_min(1e-20) + 1e-10)  # (F, T)
    return S, torch.arange(S.shape[1]) * hop / rate, torch.arange(S.shape[0]) * rate / n_fft


def plot_clip(ds, i, png_path, title):
    """Save clip i of AudioDataset `ds` as a waveform above its spectrogram to png_path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = ds.waveforms()[i]  # (L,)
    S, times, freqs = spectrogram_db(x, ds.rate)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, layout="constrained")
    fig.suptitle(title, fontsize=9)
    ax1.plot(np.arange(len(x)) / ds.rate, x.numpy(), lw=0.5)
    ax1.set(ylabel="amplitude")
    mesh = ax2.pcolormesh(times.numpy(), freqs.numpy(), S.clamp_min(-80).numpy(), shading="auto", cmap="magma")
    ax2.set(xlabel="time (s)", ylabel="frequency (Hz)")
    fig.colorbar(mesh, ax=ax2, label="dB re max")
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
