"""Sound files: the WAV round trip, mono mix-down, resampling, the refusals (unreadable, silent, clipped, a rate
that cannot serve), and a folder of your own clips with class sub-folders."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from minidiffusion.data import audio
from minidiffusion.errors import ConfigError, DataError, OutputError


def sine(f: float, rate: int, seconds: float = 0.5, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * f * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spec.argmax()])


def test_wav_round_trip_16_bit_and_float(tmp_path):
    x = sine(440, 16000) + sine(3000, 16000, amp=0.3)
    path = audio.write_wav(tmp_path / "a.wav", x, 16000)
    assert path == tmp_path / "a.wav" and sf.info(str(path)).subtype == "PCM_16"
    y = audio.read_audio(path, 16000)
    assert y.dtype == np.float32 and y.shape == x.shape and np.abs(y - x).max() < 1e-4
    audio.write_wav(tmp_path / "f.wav", torch.from_numpy(x), 16000, subtype="FLOAT")
    assert np.array_equal(audio.read_audio(tmp_path / "f.wav", 16000), x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "f.wav"]  # no temporary file left


def test_write_wav_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ConfigError, match="peaks at 1.5, beyond full scale"):
        audio.write_wav(tmp_path / "a.wav", np.full(10, 1.5, np.float32), 16000)
    with pytest.raises(ConfigError, match=r"one mono wave \[T\], got an array of shape \[2, 10\]"):
        audio.write_wav(tmp_path / "a.wav", np.zeros((2, 10), np.float32), 16000)
    with pytest.raises(ConfigError, match="NaN"):
        audio.write_wav(tmp_path / "a.wav", np.full(10, np.nan, np.float32), 16000)
    with pytest.raises(ConfigError, match="subtype must be one of"):
        audio.write_wav(tmp_path / "a.wav", np.zeros(10, np.float32), 16000, subtype="MP3")
    with pytest.raises(OutputError, match="cannot write"):
        audio.write_wav(tmp_path, np.zeros(10, np.float32), 16000)  # a folder is in the way
    assert list(tmp_path.iterdir()) == []


def test_stereo_is_mixed_down_and_resampled(tmp_path):
    left, right = sine(1000, 48000), sine(1000, 48000, amp=0.1)
    sf.write(str(tmp_path / "s.wav"), np.stack([left, right], 1), 48000, subtype="FLOAT")
    y = audio.read_audio(tmp_path / "s.wav", 16000)
    assert y.shape == (8000,) and peak_hz(y, 16000) == pytest.approx(1000, abs=3)
    assert np.abs(y[1000:-1000]).max() == pytest.approx(0.3, abs=0.005)  # the mean of the channels


def test_resampling_keeps_the_band_and_rejects_what_would_alias():
    x = sine(1000, 44100, seconds=1.0)
    y = audio.resample(x, 44100, 16000)
    assert y.dtype == np.float32 and len(y) == 16000 and peak_hz(y, 16000) == pytest.approx(1000, abs=2)
    assert np.abs(y[500:-500]).max() == pytest.approx(0.5, abs=0.005)
    alias = audio.resample(sine(11000, 44100, seconds=1.0), 44100, 16000)  # above the new Nyquist (8 kHz)
    assert 20 * np.log10(np.abs(alias[500:-500]).max() / 0.5) < -40
    assert np.array_equal(audio.resample(x, 44100, 44100), x)
    with pytest.raises(ConfigError, match=r"the ratio 16000/44101 has no small terms"):
        audio.resample(x, 44101, 16000)


def test_fit_length_and_normalize_peak():
    x = np.arange(1, 6, dtype=np.float32)
    assert audio.fit_length(x, 3).tolist() == [1, 2, 3] and audio.fit_length(x, 7).tolist() == [1, 2, 3, 4, 5, 0, 0]
    y = audio.normalize_peak(np.array([0.1, -0.2], np.float32))
    assert y.dtype == np.float32 and float(np.abs(y).max()) == pytest.approx(audio.PEAK)
    with pytest.raises(DataError, match="is silent"):
        audio.normalize_peak(np.zeros(100, np.float32))


def test_unreadable_and_empty_files_are_refused(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"this is not a sound file at all" * 10)
    with pytest.raises(DataError, match=r"cannot read .*junk.wav as sound \(.*\); give a WAV, FLAC"):
        audio.read_audio(tmp_path / "junk.wav", 16000)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), 16000)
    with pytest.raises(DataError, match="holds no samples"):
        audio.read_audio(tmp_path / "empty.wav", 16000)
    with pytest.raises(DataError, match="does not exist"):
        audio.read_audio(tmp_path / "none.wav", 16000)


def test_silent_input_is_refused(tmp_path):
    sf.write(str(tmp_path / "quiet.wav"), np.full(1600, 1e-5, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(DataError, match=r"quiet.wav is silent \(peak -100 dBFS, below -80 dBFS"):
        audio.read_audio(tmp_path / "quiet.wav", 16000)


def test_clipped_input_is_refused_with_the_reason(tmp_path):
    hot = np.clip(sine(200, 16000, amp=1.5), -1, 1)  # an overloaded recording: flat tops at both rails
    sf.write(str(tmp_path / "hot.wav"), hot, 16000, subtype="PCM_16")
    with pytest.raises(DataError, match="is clipped: its waveform has flat tops stuck at full scale, distortion"):
        audio.read_audio(tmp_path / "hot.wav", 16000)
    assert audio.read_audio(tmp_path / "hot.wav", 16000, allow_clipped=True).shape == (8000,)
    assert audio.is_clipped(hot) and not audio.is_clipped(sine(200, 16000, amp=0.9))
    assert not audio.is_clipped(sine(200, 16000, amp=1.0))  # normalised to full scale is not clipped
    assert not audio.is_clipped(np.clip(sine(200, 16000, amp=0.5), -0.4, 0.4))  # far from full scale


def test_a_rate_below_the_target_is_refused_with_the_reason(tmp_path):
    sf.write(str(tmp_path / "phone.wav"), sine(440, 8000), 8000)
    with pytest.raises(DataError, match=r"sampled at 8000 Hz, below the 16000 Hz asked for: it has no sound above "
                                        r"4000 Hz, so upsampling would leave the top of every spectrogram empty"):
        audio.read_audio(tmp_path / "phone.wav", 16000)
    assert audio.read_audio(tmp_path / "phone.wav", 16000, allow_upsampling=True).shape == (8000,)
    sf.write(str(tmp_path / "odd.wav"), sine(440, 44101), 44101)
    with pytest.raises(DataError, match=r"odd.wav: cannot resample 44101 Hz to 16000 Hz: the ratio 16000/44101"):
        audio.read_audio(tmp_path / "odd.wav", 16000)
    with pytest.raises(ConfigError, match="sample_rate must be an integer in 1000..384000, got 100"):
        audio.read_audio(tmp_path / "phone.wav", 100)


def test_a_folder_with_class_sub_folders(tmp_path):
    for name, rate, f, seconds in (("bird/a.wav", 22050, 2000, 0.5), ("bird/deep/b.flac", 16000, 3000, 3.0),
                                   ("dog/c.wav", 44100, 300, 1.0)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(tmp_path / name), sine(f, rate, seconds, amp=0.2), rate)
    (tmp_path / "dog" / "silent.wav").write_bytes(b"")  # unreadable: skipped with a warning
    (tmp_path / "dog" / "notes.txt").write_text("not sound")
    with pytest.warns(UserWarning, match=r"skipping a sound file: cannot read .*silent.wav"):
        waves, labels, names = audio.load_audio_folder(tmp_path, 16000, 2.032)
    assert names == ["bird", "dog"] and labels.tolist() == [0, 0, 1]
    assert waves.shape == (3, 32512) and waves.dtype == torch.float32
    assert torch.allclose(waves.abs().amax(1), torch.tensor(audio.PEAK))  # peak-normalised
    assert (waves[0, 8000:] == 0).all() and (waves[1, -100:] != 0).any()  # padded; cut
    assert peak_hz(waves[2, :16000].numpy(), 16000) == pytest.approx(300, abs=2)


def test_an_unlabelled_folder_and_the_folder_refusals(tmp_path):
    sf.write(str(tmp_path / "x.wav"), sine(440, 16000), 16000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        waves, labels, names = audio.load_audio_folder(tmp_path, 16000, 1.0, normalize=False)
    assert waves.shape == (1, 16000) and labels is None and names is None
    assert float(waves.abs().max()) == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        audio.load_audio_folder(tmp_path / "nope", 16000, 1.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .aif/.aiff/.flac/.ogg/.wav files found"):
        audio.load_audio_folder(tmp_path / "empty", 16000, 1.0)
    sf.write(str(tmp_path / "empty" / "z.wav"), np.zeros(1600, np.float32), 16000)
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"none of the 1 sound files .* could be used; "
                                                                   r"the first: .*z.wav is silent"):
        audio.load_audio_folder(tmp_path / "empty", 16000, 1.0)
    with pytest.raises(ConfigError, match="seconds must be a number in"):
        audio.load_audio_folder(tmp_path, 16000, 0)
