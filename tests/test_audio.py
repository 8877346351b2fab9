"""diagssm.tasks.audio: the resampler against scipy, WAV reading, espeak-ng, the augmentations."""
import shutil
import wave

import numpy as np
import pytest
import torch
from scipy.signal import chirp, resample_poly

from diagssm.tasks import audio
from diagssm.tasks.cache import DataError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def write_wav(path, samples, rate=16000, channels=1, width=2):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(np.asarray(samples, dtype="<i2").tobytes())


@pytest.mark.parametrize("orig, new", [(22050, 16000), (16000, 8000), (8000, 16000)])
def test_resample_matches_scipy_resample_poly_on_a_chirp(orig, new):
    t = np.arange(orig) / orig  # 1 s
    x = chirp(t, 50.0, 1.0, 0.8 * min(orig, new) / 2)  # (orig,) sweeps to 80% of the lower Nyquist
    y = audio.resample(x, orig, new)
    g = np.gcd(orig, new)
    ref = resample_poly(x, new // g, orig // g)
    assert y.shape == ref.shape == (new,)
    inner = slice(200, -200)  # the two filters differ in length, hence at the edges
    assert np.abs(y[inner] - ref[inner]).max() < 5e-3
    assert np.sqrt(np.mean((y[inner] - ref[inner]) ** 2)) < 1.5e-3


@pytest.mark.parametrize("orig, new", [(22050, 16000), (16000, 8000)])
def test_resample_removes_content_above_the_new_nyquist(orig, new):
    t = np.arange(orig) / orig
    nyq = new / 2
    for f in (1.0 * nyq, 1.05 * nyq, 1.3 * nyq):
        y = audio.resample(np.sin(2 * np.pi * f * t), orig, new)
        assert np.abs(y[300:-300]).max() < 1e-3, f  # below -60 dB: no alias
    for f in (0.25 * nyq, 0.8 * nyq):  # the passband keeps its amplitude (RMS of a unit sine: 1/sqrt 2)
        y = audio.resample(np.sin(2 * np.pi * f * t), orig, new)
        assert abs(np.sqrt(2 * np.mean(y[300:-300] ** 2)) - 1.0) < 3e-3, f


def test_resample_shapes_batches_and_identity():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 1001))
    y = audio.resample(x, 16000, 8000)
    assert y.shape == (3, 501)  # ceil(1001 / 2)
    np.testing.assert_allclose(y[1], audio.resample(x[1], 16000, 8000), atol=1e-12)
    assert audio.resample(x, 22050, 16000).shape == (3, -(-1001 * 320 // 441))
    np.testing.assert_array_equal(audio.resample(x, 16000, 16000), x)
    with pytest.raises(ValueError, match="new=0"):
        audio.resample(x, 16000, 0)
    with pytest.raises(ValueError, match="orig=16000.5"):
        audio.resample(x, 16000.5, 8000)


def test_read_wav_round_trip_and_bad_files(tmp_path):
    x = (np.sin(np.arange(3000) / 7.0) * 20000).astype(np.int16)
    write_wav(tmp_path / "ok.wav", x, rate=16000)
    rate, y = audio.read_wav(tmp_path / "ok.wav")
    assert rate == 16000 and y.dtype == np.int16
    np.testing.assert_array_equal(y, x)
    data = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:-1000])
    with pytest.raises(DataError, match=r"cut\.wav: truncated WAV: the header says 3000 samples, the file holds 2500"):
        audio.read_wav(tmp_path / "cut.wav")
    (tmp_path / "text.wav").write_text("not audio at all")
    with pytest.raises(DataError, match=r"text\.wav: not a readable WAV file"):
        audio.read_wav(tmp_path / "text.wav")
    (tmp_path / "stub.wav").write_bytes(data[:20])
    with pytest.raises(DataError, match=r"stub\.wav: not a readable WAV file"):
        audio.read_wav(tmp_path / "stub.wav")
    write_wav(tmp_path / "stereo.wav", np.zeros(200), channels=2)
    with pytest.raises(DataError, match=r"stereo\.wav: expected 16-bit mono PCM, got 16-bit with 2 channels"):
        audio.read_wav(tmp_path / "stereo.wav")
    with pytest.raises(DataError, match=r"absent\.wav: no such file"):
        audio.read_wav(tmp_path / "absent.wav")


@needs_espeak
def test_espeak_speaks_and_names_the_failing_command():
    rate, x = audio.espeak("yes", "en-us+f3", 150, 60)
    assert rate == 22050 and x.dtype == np.int16 and 0.3 * rate < len(x) < 1.5 * rate
    assert np.abs(x.astype(np.int32)).max() > 3000
    np.testing.assert_array_equal(audio.espeak("yes", "en-us+f3", 150, 60)[1], x)  # deterministic
    with pytest.raises(audio.SynthesisError, match=r"`espeak-ng -v zzzvoice -s 150 -p 60 --stdout yes` "
                                                   r"failed with exit status 1: .*voice does not exist"):
        audio.espeak("yes", "zzzvoice", 150, 60)


def test_espeak_missing_program_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(audio, "ESPEAK", "espeak-ng-not-here")
    with pytest.raises(audio.SynthesisError,
                       match=r"espeak-ng-not-here is not installed \(apt-get install espeak-ng\)"):
        audio.espeak("yes", "en-us", 150, 50)


def test_colored_noise_has_unit_rms_and_its_spectral_slope():
    rng = np.random.default_rng(2)
    n = 1 << 16
    f = np.fft.rfftfreq(n)
    for exponent in (0.0, 1.0, 2.0):
        x = audio.colored_noise(n, exponent, rng)
        assert abs(np.sqrt(np.mean(x ** 2)) - 1) < 1e-9
        power = np.abs(np.fft.rfft(x)) ** 2
        low, high = power[(f > 0.01) & (f < 0.02)].mean(), power[(f > 0.1) & (f < 0.2)].mean()
        expected = np.log10(np.mean(1 / f[(f > 0.01) & (f < 0.02)] ** exponent)
                            / np.mean(1 / f[(f > 0.1) & (f < 0.2)] ** exponent))
        assert abs(np.log10(low / high) - expected) < 0.1, exponent  # within 1 dB


def test_reverb_ir_direct_path_energy_and_decay():
    rng = np.random.default_rng(3)
    ir = audio.reverb_ir(0.2, 10.0, 16000, rng)
    assert ir.shape == (3201,) and ir[0] == 1.0
    assert abs(np.sum(ir[1:] ** 2) - 0.1) < 1e-12  # 10 dB below the direct path
    first, last = np.sum(ir[1:321] ** 2), np.sum(ir[-320:] ** 2)  # first and last 20 ms
    assert 10 * np.log10(first / last) > 45  # decays by about 60 dB over rt60
    x = np.zeros(100)
    x[10] = 1.0
    np.testing.assert_allclose(audio.convolve(x, ir[:50]), np.concatenate([np.zeros(10), ir[:50], np.zeros(40)]),
                               atol=1e-12)


def test_add_noise_at_snr_measures_the_word_span():
    rng = np.random.default_rng(4)
    x = np.zeros(8000)
    x[2000:4000] = np.sin(np.arange(2000) / 5.0)  # power 0.5 in the span
    noise = rng.standard_normal(8000)
    y = add = audio.add_noise_at_snr(x, noise, (2000, 4000), 20.0)
    added = add - x
    assert abs(10 * np.log10(np.mean(x[2000:4000] ** 2) / np.mean(added ** 2)) - 20.0) < 1e-9
    np.testing.assert_allclose(added / noise, (added / noise)[0])  # the noise scaled, nothing else
    assert y.shape == x.shape


def test_quantize_and_audio_dataset_round_trip():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 300)) * np.array([[0.01], [0.1], [1.0], [3.0]])
    q, scale = audio.quantize(x)
    assert q.dtype == np.int16 and scale.dtype == np.float32
    assert (np.abs(q).max(axis=1) == 32767).all()
    error = np.abs(q * scale[:, None].astype(np.float64) - x).max(axis=1)  # (4,)
    assert (error <= scale * 0.5 + 1e-6 * np.abs(x).max(1)).all()
    ds = audio.AudioDataset(q, scale, np.arange(4), ["a", "b", "c", "d"], 16000)
    item, label = ds[2]
    assert item.shape == (300, 1) and item.dtype == torch.float32 and int(label) == 2
    torch.testing.assert_close(item[:, 0], torch.from_numpy(x[2]).float(), atol=float(scale[2]), rtol=0)
    half = ds.resampled(8000)
    assert half.q.shape == (4, 150) and half.rate == 8000 and half.classes == ds.classes


def test_spectrogram_peaks_at_the_tone_frequency():
    t = torch.arange(16000) / 16000
    S, times, freqs = audio.spectrogram_db(torch.sin(2 * torch.pi * 1000 * t), 16000)
    assert S.shape == (257, 126) and times.shape == (126,) and freqs.shape == (257,)
    peak = freqs[S.mean(dim=1).argmax()]
    assert abs(float(peak) - 1000) <= 16000 / 512
    assert float(S.max()) == 0.0
