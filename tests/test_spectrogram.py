"""Mel spectrograms and their inverse: the filter bank and STFT against librosa (the test oracle), the image's
shape and range, the range checks, and Griffin-Lim's convergence against librosa.griffinlim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minidiffusion.data import spectrogram as sp
from minidiffusion.errors import ConfigError

CFG = sp.SpectrogramConfig()
SHORT = sp.SpectrogramConfig(frames=48)  # 0.75 s: Griffin-Lim tests stay fast


@pytest.fixture(autouse=True)
def one_thread():
    """Griffin-Lim's many small FFTs run fastest on one thread (and far slower on a busy machine's second one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def librosa():
    """librosa, the test oracle; FAILS (never skips) the test when it is missing."""
    try:
        import librosa
    except ImportError as e:
        pytest.fail(f"spectrogram tests compare against librosa (`pip install librosa`, in the dev extra): {e}",
                    pytrace=False)
    return librosa


def tone(n: int, f0: float = 220.0, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A decaying harmonic tone with a little noise: float32 [n], peak about 0.6."""
    t = np.arange(n) / rate
    x = sum(np.sin(2 * np.pi * f0 * k * t + k) / k for k in range(1, 8)) * np.exp(-2 * t)
    x = x + 0.003 * np.random.default_rng(seed).standard_normal(n)
    return (0.6 * x / np.abs(x).max()).astype(np.float32)


@pytest.mark.parametrize("sr,n_fft,n_mels,fmin,fmax", [
    (16000, 1024, 128, 0.0, 8000.0), (22050, 2048, 128, 0.0, None), (16000, 512, 40, 50.0, 7000.0),
    (44100, 4096, 256, 20.0, 16000.0)])
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax, librosa):
    ours = sp.mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    assert ours.dtype == torch.float32 and ours.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-5)
    assert (ours.sum(1) > 0).all()  # no empty filter


def test_mel_scale_round_trips(librosa):
    f = np.array([0.0, 500.0, 999.0, 1000.0, 4000.0, 8000.0])
    np.testing.assert_allclose(sp.mel_to_hz(sp.hz_to_mel(f)), f, atol=1e-6)
    np.testing.assert_allclose(sp.hz_to_mel(f), librosa.hz_to_mel(f), atol=1e-9)


def test_stft_and_mel_shapes_match_librosa(librosa):
    x = np.stack([tone(CFG.samples), tone(CFG.samples, 440.0, seed=1)])
    spec = sp.stft(torch.from_numpy(x), CFG)
    assert spec.dtype == torch.complex64 and spec.shape == (2, 513, 128)
    ref = np.abs(librosa.stft(x[1], n_fft=1024, hop_length=256))
    np.testing.assert_allclose(spec[1].abs().numpy(), ref, rtol=0, atol=1e-5 * ref.max())
    mel = sp.mel_power(x, CFG)
    assert mel.shape == (2, 128, 128) and (mel >= 0).all()
    ref_mel = librosa.feature.melspectrogram(y=x[0], sr=16000, n_fft=1024, hop_length=256, n_mels=128, fmax=8000)
    np.testing.assert_allclose(mel[0].numpy(), ref_mel, rtol=0, atol=1e-5 * ref_mel.max())
    back = sp.istft(spec, CFG, CFG.samples)
    assert back.shape == (2, CFG.samples) and torch.allclose(back, torch.from_numpy(x), atol=1e-5)


def test_the_clip_gives_a_128_by_128_image_in_range():
    assert CFG.samples == 32512 and CFG.seconds == pytest.approx(2.032) and CFG.n_freqs == 513
    x = np.stack([tone(CFG.samples), np.zeros(CFG.samples, np.float32)])
    img = sp.wave_to_image(x, CFG)
    assert img.shape == (2, 1, 128, 128) and img.dtype == torch.float32
    assert float(img.min()) == -1.0 and float(img.max()) <= 1.0
    assert (img[1] == -1).all()  # silence is the floor
    assert sp.wave_to_image(x[0]).shape == (1, 128, 128)
    t = np.arange(CFG.samples) / 16000
    full = np.sin(2 * np.pi * 55.0 * t).astype(np.float32)  # a full-scale sine: the loudest a band gets
    assert 0.95 < float(sp.wave_to_image(full).max()) < 1.0  # max_db sits just above it: nothing saturates
    high = sp.wave_to_image((0.5 * np.sin(2 * np.pi * 6000.0 * t)).astype(np.float32))[0]
    assert int(high.mean(1).argmax()) < 20  # row 0 is the highest band: a high tone lights the top rows


def test_pixels_and_power_invert_each_other():
    power = torch.tensor([[0.0, 1e-6, 1.0, 100.0, 3000.0]])
    img = sp.power_to_image(power, CFG)
    assert img.tolist()[0][0] == -1.0 and img.max() <= 1
    back = sp.image_to_power(img, CFG)
    assert back[0, 0] == 0 and back[0, 1] == 0  # at or below the floor (35 - 80 dB): silence
    torch.testing.assert_close(back[0, 2:], power[0, 2:], rtol=1e-4, atol=0)


def test_a_clip_of_the_wrong_length_is_refused():
    with pytest.raises(ConfigError, match=r"needs clips of 32512 samples \(2.032 s at 16000 Hz\), got 32000 samples"):
        sp.wave_to_image(np.zeros(32000, np.float32))
    with pytest.raises(ConfigError, match=r"expected spectrogram images \[\.\.\., 1, 128, frames\]"):
        sp.image_to_wave(torch.zeros(2, 128, 128))


@pytest.mark.parametrize("kw,msg", [
    ({"hop": 0}, "hop must be an integer in 1..1024, got 0"),
    ({"fmax": 9000.0}, r"fmax must be a number in \(0, 8000\], got 9000"),
    ({"fmin": 8000.0}, r"fmin must be a number in \[0, 8000\), got 8000"),
    ({"n_mels": 600}, "n_mels must be an integer in 1..513, got 600"),
    ({"hop": 900}, "less than 25% overlap"),
    ({"top_db": 0.0}, r"top_db must be a number in \(0, 200\]"),
    ({"frames": 0}, "frames must be an integer"),
    ({"sample_rate": 16000.5}, "sample_rate must be an integer"),
])
def test_config_ranges_are_checked(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        sp.SpectrogramConfig(**kw)


def _sc(mag, wave, cfg=SHORT) -> float:
    return float(sp.spectral_convergence(mag, torch.as_tensor(wave), cfg))


def test_griffin_lim_converges_and_matches_librosa(librosa):
    x = tone(SHORT.samples)
    mag = sp.magnitude(x, SHORT)
    assert _sc(mag, x) < 1e-5
    ours = {n: _sc(mag, sp.griffin_lim(mag, SHORT, n)) for n in (8, 32, 100)}
    assert ours[8] > ours[32] > ours[100] and ours[100] < 0.05
    kw = {"n_fft": 1024, "hop_length": 256}
    for momentum in (0.0, 0.99):  # the same start (zero phase): the same algorithm gives the same result
        a = _sc(mag, sp.griffin_lim(mag, SHORT, 32, momentum, init="zeros"))
        b = _sc(mag, librosa.griffinlim(mag.numpy(), n_iter=32, momentum=momentum, init=None, **kw))
        assert a == pytest.approx(b, abs=2e-3)
    ref = _sc(mag, librosa.griffinlim(mag.numpy(), n_iter=32, random_state=0, **kw))
    assert ours[32] < 1.5 * ref  # random starts differ, the convergence is comparable
    plain = _sc(mag, sp.griffin_lim(mag, SHORT, 32, momentum=0.0))
    assert ours[32] < plain  # the fast variant beats plain Griffin-Lim at the same count


def test_griffin_lim_is_seeded_and_batched():
    x = np.stack([tone(SHORT.samples), tone(SHORT.samples, 330.0, seed=2)])
    mag = sp.magnitude(x, SHORT)
    a, b = sp.griffin_lim(mag, SHORT, 4, seed=1), sp.griffin_lim(mag, SHORT, 4, seed=1)
    assert a.shape == (2, SHORT.samples) and torch.equal(a, b)
    assert not torch.equal(a, sp.griffin_lim(mag, SHORT, 4, seed=2))
    for kw, msg in (({"n_iter": -1}, "n_iter must be"), ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\)"),
                    ({"init": "ones"}, "init must be one of random, zeros")):
        with pytest.raises(ConfigError, match=msg):
            sp.griffin_lim(mag, SHORT, **kw)


def test_image_round_trip_recovers_the_sound():
    x = np.stack([tone(CFG.samples), tone(CFG.samples, 523.0, seed=3)])
    img = sp.wave_to_image(x, CFG)
    mag = sp.magnitude(x, CFG)
    nnls, pinv = sp.mel_to_magnitude(sp.mel_power(x, CFG), CFG), sp.mel_to_magnitude(sp.mel_power(x, CFG), CFG, 0)
    assert nnls.shape == mag.shape and (nnls >= 0).all()
    err = lambda m: float(torch.linalg.vector_norm(m - mag) / torch.linalg.vector_norm(mag))  # noqa: E731
    assert err(nnls) < err(pinv)  # least squares under non-negativity beats the clamped pseudo-inverse
    wave = sp.image_to_wave(img, CFG, n_iter=32)
    assert wave.shape == (2, CFG.samples) and wave.dtype == torch.float32 and float(wave.abs().max()) <= 1.0
    assert float(sp.spectral_convergence(mag, wave, CFG).max()) < 0.3
    assert float(sp.wave_to_image(wave, CFG).sub(img).abs().mean()) < 0.1


def test_the_griffin_lim_benchmark_runs_at_tiny_settings(librosa):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "griffin_lim.py"
    spec = importlib.util.spec_from_file_location("bench_griffin_lim", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(np.stack([tone(SHORT.samples), tone(SHORT.samples, 330.0)]), iters=(2,), cfg=SHORT)
    assert {(r["input"], r["method"], r["init"]) for r in rows} == {
        ("magnitude", m, i) for m in ("plain", "fast") for i in ("random", "zeros")} | {("image", "fast", "random")}
    assert all(r["sc_ours"] > 0 and r["s_per_audio_s_librosa"] > 0 for r in rows)
    zeros = [r for r in rows if r["init"] == "zeros"]
    assert all(r["sc_ours"] == pytest.approx(r["sc_librosa"], abs=2e-3) for r in zeros)
    assert bench.markdown(rows).startswith("| input | method | init | n_iter | SC ours |")
