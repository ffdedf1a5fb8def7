"""Sound files: read and write WAV/FLAC through `soundfile`, resample, and load a folder of your own clips.

A wave is float32 [T] in [-1, 1] at a stated sample rate (Hz). `read_audio` mixes channels down to
mono and resamples with `scipy.signal.resample_poly` (a polyphase Kaiser-windowed FIR: an exact
rational ratio, linear phase, no torchaudio); it refuses, each with one sentence, a file that cannot
be read, one that is silent, one that is clipped (flat tops stuck at full scale: the distortion
is in the file, and a model would learn it) and a sample rate that cannot serve (below the target,
which would leave the top of every spectrogram empty, or with no small ratio to it).
`write_wav` writes atomically (never half a file), 16-bit PCM by default.

`load_audio_folder` reads `root/<class>/**/*.wav` (one class per sub-folder, names sorted) or files
directly in `root` (unlabelled), each cut or zero-padded to a fixed length and peak-normalised;
files that cannot be used are skipped with a warning naming them and why.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import check_choice, check_number
from ..errors import ConfigError, DataError
from ..paths import atomic_write

__all__ = ["AUDIO_SUFFIXES", "PEAK", "SILENCE", "normalize_peak", "fit_length", "resample", "is_clipped",
           "read_audio", "write_wav", "list_audio", "load_audio_folder"]

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".aiff", ".aif"}
PEAK = 0.9  # loudness normalisation: every clip's peak, 1 dB below full scale
SILENCE = 1e-4  # a peak below this (-80 dBFS, the spectrogram's floor below its ceiling) is silence
_CLIP_RUN = 3  # samples in a row stuck at full scale that make a flat top ...
_CLIP_TOPS = 3  # ... and how many such flat tops make a file clipped
_MAX_RATIO = 1000  # the largest up or down factor resample_poly is asked for


def _peak_dbfs(peak: float) -> str:
    return "-inf dBFS" if peak <= 0 else f"{20 * math.log10(peak):.0f} dBFS"


def normalize_peak(wave: np.ndarray, peak: float = PEAK, what: str = "the wave") -> np.ndarray:
    """Return float32 `wave` (any shape) scaled so its largest |sample| is `peak`; silence raises DataError."""
    wave = np.asarray(wave, dtype=np.float32)
    top = float(np.abs(wave).max()) if wave.size else 0.0
    if not math.isfinite(top):
        raise DataError(f"{what} holds NaN or infinite samples; it cannot be normalised")
    if top < SILENCE:
        raise DataError(f"{what} is silent (peak {_peak_dbfs(top)}, below -80 dBFS), so there is nothing to "
                        "normalise; give a recording with sound in it")
    return wave * np.float32(peak / top)


def fit_length(wave: np.ndarray, n: int) -> np.ndarray:
    """Return float32 [n]: the first `n` samples of `wave` [T], zero-padded at the end when T < n."""
    check_number("n", n, lo=1, integer=True)
    wave = np.asarray(wave, dtype=np.float32)
    if len(wave) >= n:
        return wave[:n].copy()
    return np.concatenate([wave, np.zeros(n - len(wave), np.float32)])


def _ratio(from_rate: int, to_rate: int) -> tuple[int, int]:
    g = math.gcd(from_rate, to_rate)
    return to_rate // g, from_rate // g


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Return float32 [T * to_rate / from_rate] (rounded up): `wave` [T] resampled from `from_rate` to `to_rate` Hz.

    scipy.signal.resample_poly: upsample by `up`, low-pass (Kaiser window, beta 5), downsample by `down`,
    where up / down is to_rate / from_rate in lowest terms; neither may exceed 1000.
    """
    check_number("from_rate", from_rate, lo=1, integer=True)
    check_number("to_rate", to_rate, lo=1, integer=True)
    wave = np.asarray(wave, dtype=np.float32)
    if from_rate == to_rate:
        return wave.copy()
    up, down = _ratio(from_rate, to_rate)
    if max(up, down) > _MAX_RATIO:
        raise ConfigError(f"cannot resample {from_rate} Hz to {to_rate} Hz: the ratio {up}/{down} has no small "
                          f"terms (at most {_MAX_RATIO}) for the polyphase resampler; convert the file to a standard "
                          f"rate first (e.g. `sox in.wav -r {to_rate} out.wav`)")
    from scipy.signal import resample_poly

    return resample_poly(wave, up, down).astype(np.float32)


def is_clipped(wave: np.ndarray, full_scale: float = 1.0) -> bool:
    """Return True if mono `wave` [T] has flat tops: at least 3 runs of 3+ samples in a row stuck at its highest
    (or lowest) value, that value within 1% of +-`full_scale` (what an overloaded recorder or a too-loud export
    leaves; a 16-bit file's two rails are 32767/32768 and -1)."""
    wave = np.asarray(wave)
    if not wave.size:
        return False
    tops = 0
    for rail in (wave.max(), wave.min()):
        if abs(float(rail)) < 0.99 * full_scale:
            continue
        stuck = np.concatenate([[False], wave == rail, [False]])
        edges = np.flatnonzero(np.diff(stuck.astype(np.int8)))  # run starts and ends, alternating
        tops += int(np.sum(edges[1::2] - edges[::2] >= _CLIP_RUN))
    return tops >= _CLIP_TOPS


def read_audio(path: str | Path, sample_rate: int, *, allow_clipped: bool = False,
               allow_upsampling: bool = False) -> np.ndarray:
    """Return the sound file at `path` as a mono wave float32 [T] in [-1, 1] at `sample_rate` Hz.

    Channels are averaged; another rate is resampled (`resample`). Raises DataError for a file that
    cannot be read, holds no samples, is silent (peak below -80 dBFS) or is clipped (unless
    `allow_clipped`), and for a rate below `sample_rate` (unless `allow_upsampling`). A wave whose peak
    exceeds 1 (a float file's level beyond full scale, or the resampler's overshoot) is scaled down to 1.
    """
    import soundfile as sf

    check_number("sample_rate", sample_rate, lo=1000, hi=384000, integer=True)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sound file {path} does not exist or is not a file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors (sf.LibsndfileError, RuntimeError) for any unreadable file
        raise DataError(f"cannot read {path} as sound ({' '.join(str(e).split())}); give a WAV, FLAC, OGG or AIFF "
                        "file") from None
    if not data.size:
        raise DataError(f"{path} holds no samples; give a recording that is not empty")
    if not np.isfinite(data).all():
        raise DataError(f"{path} holds NaN or infinite samples; export it again as 16-bit or float WAV")
    if not allow_clipped and any(is_clipped(data[:, c]) for c in range(data.shape[1])):
        raise DataError(f"{path} is clipped: its waveform has flat tops stuck at full scale, distortion that a "
                        "model would learn as part of the sound; record it again at a lower level (or export it "
                        "quieter), or pass allow_clipped=True to use it anyway")
    wave = data.mean(axis=1)
    peak = float(np.abs(wave).max())
    if peak < SILENCE:
        raise DataError(f"{path} is silent (peak {_peak_dbfs(peak)}, below -80 dBFS, the spectrogram's floor); "
                        "check the recording level or the file")
    if peak > 1.0:
        wave = wave / np.float32(peak)
    if rate < sample_rate and not allow_upsampling:
        raise DataError(f"{path} is sampled at {rate} Hz, below the {sample_rate} Hz asked for: it has no sound "
                        f"above {rate // 2} Hz, so upsampling would leave the top of every spectrogram empty; "
                        f"record or export it at {sample_rate} Hz or more, or pass allow_upsampling=True")
    try:
        wave = resample(wave, rate, sample_rate)
    except ConfigError as e:
        raise DataError(f"{path}: {e}") from None
    peak = float(np.abs(wave).max())
    return wave / np.float32(peak) if peak > 1.0 else wave  # the low-pass can overshoot a full-scale peak


def write_wav(path: str | Path, wave, sample_rate: int, subtype: str = "PCM_16") -> Path:
    """Write a mono wave [T] in [-1, 1] (numpy or torch) as a WAV file at `path`, atomically; return the path.

    `subtype` 'PCM_16' (16-bit, rounding error below 2e-5), 'PCM_24' or 'FLOAT' (exact float32).
    """
    import soundfile as sf

    check_choice("subtype", subtype, ("PCM_16", "PCM_24", "FLOAT"))
    check_number("sample_rate", sample_rate, lo=1, hi=384000, integer=True)
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or not wave.size:
        raise ConfigError(f"write_wav writes one mono wave [T], got an array of shape {list(wave.shape)}")
    if not np.isfinite(wave).all():
        raise ConfigError("the wave holds NaN or infinite samples; it cannot be written as sound")
    peak = float(np.abs(wave).max())
    if peak > 1.0:
        raise ConfigError(f"the wave peaks at {peak:.3g}, beyond full scale [-1, 1]: it would clip; scale it down "
                          "first (e.g. minidiffusion.data.audio.normalize_peak)")
    path = Path(path)
    with atomic_write(path) as tmp:
        sf.write(str(tmp), wave, sample_rate, subtype=subtype, format="WAV")
    return path


def list_audio(root: str | Path) -> tuple[list[Path], list[str] | None]:
    """Return (sound file paths relative to `root`, sorted; class names sorted, or None when unlabelled)
    (`folders.list_class_files`: one class per top-level sub-folder, hidden files ignored)."""
    from .folders import list_class_files

    return list_class_files(root, AUDIO_SUFFIXES, "sound", ".wav/.flac files")


def load_audio_folder(root: str | Path, sample_rate: int, seconds: float, normalize: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """Return (waves float32 [N, T] in [-1, 1], labels int64 [N] or None, class names or None), T = seconds * rate.

    Each file is read with `read_audio` (mono, resampled to `sample_rate` Hz), cut to its first
    `seconds` or zero-padded, and with `normalize` peak-normalised to `PEAK` like the instrument set.
    A file that cannot be used (unreadable, silent, clipped, a rate below `sample_rate`) is skipped
    with a warning saying why; a folder with none usable raises DataError with the first reason.
    """
    check_number("sample_rate", sample_rate, lo=1000, hi=384000, integer=True)
    check_number("seconds", seconds, lo=0, hi=3600, lo_open=True)
    n = round(seconds * sample_rate)
    if n < 1:
        raise ConfigError(f"seconds={seconds} is shorter than one sample at {sample_rate} Hz")
    root = Path(root).expanduser()
    files, class_names = list_audio(root)
    if not files:
        raise DataError(f"no {'/'.join(sorted(AUDIO_SUFFIXES))} files found in {root}; put your recordings there "
                        "(optionally in one sub-folder per class)")
    waves, labels, skipped = [], [], []
    index = {c: i for i, c in enumerate(class_names or [])}
    for rel in files:
        path = root / rel
        try:
            wave = fit_length(read_audio(path, sample_rate), n)
            if normalize:
                wave = normalize_peak(wave, what=f"{path} (its first {seconds:g} s)")
        except DataError as e:
            skipped.append(str(e))
            warnings.warn(f"skipping a sound file: {e}", stacklevel=2)
            continue
        waves.append(wave)
        if class_names is not None:
            labels.append(index[rel.parts[0]])
    if not waves:
        raise DataError(f"none of the {len(files)} sound files in {root} could be used; the first: {skipped[0]}")
    out = torch.from_numpy(np.stack(waves))
    return out, (torch.tensor(labels, dtype=torch.int64) if class_names is not None else None), class_names
