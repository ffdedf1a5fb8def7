"""Sound as an image: a mel spectrogram in [-1, 1], and back to a wave with Griffin-Lim.

Forward: the short-time Fourier transform (`torch.stft`: periodic Hann window of `n_fft`, hop `hop`,
centred frames with zero padding, as librosa's default), its power |X|^2 through a mel filter bank
(Slaney's mel scale and area normalisation, librosa's default, `mel_filterbank`), in dB, mapped
linearly from [max_db - top_db, max_db] to [-1, 1] and clamped. The dB range is *fixed*, not relative
to each clip's loudest bin (diffusers' audio-diffusion uses ref=max): a pixel means the same level in
every clip, and the inverse needs no per-clip number. `max_db` sits just above the mel power of a
full-scale sine (librosa's scale: unnormalised STFT, Slaney filters), so no wave in [-1, 1] saturates,
and `top_db` 80 puts the floor 80 dB below it. The image is [1, n_mels, frames] (NCHW's C, H, W): row 0
is the *highest* band, so a PNG of it reads like a spectrogram, low pitches at the bottom.

Inverse: pixels back to mel power, mel power to linear power by non-negative least squares against
the filter bank (`mel_to_magnitude`: the pseudo-inverse clamped at 0, refined by accelerated
projected-gradient steps), its square root as the magnitude, and the phase by Griffin-Lim
(`griffin_lim`): plain (momentum 0) or Perraudin et al.'s fast variant (momentum 0.99, librosa's
default), `n_iter` iterations of `torch.istft` / `torch.stft`.

The defaults (16 kHz, n_fft 1024, hop 256, 128 mel bands up to 8 kHz, 128 frames) turn a clip of
`(frames - 1) * hop` = 32512 samples (2.032 s) into a 1 x 128 x 128 image: a 64 ms window, a 16 ms hop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..config import check_choice, check_number
from ..errors import ConfigError

__all__ = ["SpectrogramConfig", "hz_to_mel", "mel_to_hz", "mel_filterbank", "stft", "istft", "magnitude",
           "mel_power", "power_to_image", "image_to_power", "wave_to_image", "mel_to_magnitude", "griffin_lim",
           "image_to_wave", "spectral_convergence"]

_AMIN = 1e-10  # the smallest power taken to dB (librosa's amin), -100 dB


@dataclass(frozen=True)
class SpectrogramConfig:
    """How a wave becomes an image: rates in Hz, lengths in samples, levels in dB (see the module docstring).

    `samples` (= (frames - 1) * hop) is the clip length that gives exactly `frames` centred frames.
    """

    sample_rate: int = 16000
    n_fft: int = 1024
    hop: int = 256
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float = 8000.0
    top_db: float = 80.0
    max_db: float = 35.0
    frames: int = 128

    def __post_init__(self):
        check_number("sample_rate", self.sample_rate, lo=1000, hi=384000, integer=True)
        check_number("n_fft", self.n_fft, lo=16, hi=16384, integer=True)
        check_number("hop", self.hop, lo=1, hi=self.n_fft, integer=True)
        check_number("n_mels", self.n_mels, lo=1, hi=self.n_fft // 2 + 1, integer=True)
        check_number("fmax", self.fmax, lo=0, hi=self.sample_rate / 2, lo_open=True)
        check_number("fmin", self.fmin, lo=0, hi=self.fmax, hi_open=True)
        check_number("top_db", self.top_db, lo=0, hi=200, lo_open=True)
        check_number("max_db", self.max_db, lo=-200, hi=200)
        check_number("frames", self.frames, lo=1, hi=1_000_000, integer=True)
        if self.hop * 4 > self.n_fft * 3:
            raise ConfigError(f"hop={self.hop} leaves the {self.n_fft}-sample windows less than 25% overlap, which "
                              f"Griffin-Lim cannot invert well; use hop <= {self.n_fft * 3 // 4} (n_fft / 4 is usual)")

    @property
    def samples(self) -> int:
        """The clip length in samples whose spectrogram has exactly `frames` frames."""
        return (self.frames - 1) * self.hop

    @property
    def seconds(self) -> float:
        """The clip length in seconds."""
        return self.samples / self.sample_rate

    @property
    def n_freqs(self) -> int:
        """The number of STFT frequency bins, n_fft // 2 + 1."""
        return self.n_fft // 2 + 1


def hz_to_mel(f):
    """Return frequencies in Hz (a number or array) on Slaney's mel scale: linear below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def mel_to_hz(m):
    """Return Slaney mels (a number or array) in Hz; the inverse of `hz_to_mel`."""
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), (200.0 / 3) * m)


@lru_cache(maxsize=16)
def _filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    weights.setflags(write=False)
    return weights


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int = 128, fmin: float = 0.0,
                   fmax: float | None = None) -> torch.Tensor:
    """Return the mel filter bank, float32 [n_mels, n_fft // 2 + 1], each row a triangle in 1/Hz.

    Triangles on Slaney's mel scale between `fmin` and `fmax` (default sample_rate / 2), each scaled to
    unit area in Hz (Slaney normalisation): librosa.filters.mel's defaults (htk=False, norm='slaney').
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    SpectrogramConfig(sample_rate, n_fft, 1, n_mels, float(fmin), float(fmax))  # the same range checks
    return torch.from_numpy(_filterbank(sample_rate, n_fft, n_mels, float(fmin), float(fmax)).astype(np.float32))


def _bank(cfg: SpectrogramConfig, device: torch.device) -> torch.Tensor:
    fb = _filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, float(cfg.fmin), float(cfg.fmax))
    return torch.from_numpy(fb.astype(np.float32)).to(device)


@lru_cache(maxsize=16)
def _pinv(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> tuple[np.ndarray, float]:
    """(the filter bank's pseudo-inverse [F, n_mels], 1 / the largest eigenvalue of fb^T fb)."""
    fb = _filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
    pinv = np.linalg.pinv(fb).astype(np.float32)
    return pinv, float(1.0 / np.linalg.norm(fb, 2) ** 2)


def _as_wave(wave) -> torch.Tensor:
    x = torch.as_tensor(wave)
    if not torch.is_floating_point(x):
        raise TypeError(f"expected a float wave, got {x.dtype}")
    return x.float()


def stft(wave, cfg: SpectrogramConfig) -> torch.Tensor:
    """Return the STFT of waves [..., T]: complex64 [..., n_fft // 2 + 1, 1 + T // hop], unnormalised.

    Periodic Hann window of n_fft, centred frames, zero padding (librosa.stft's defaults).
    """
    x = _as_wave(wave)
    shape = x.shape
    window = torch.hann_window(cfg.n_fft, periodic=True, dtype=x.dtype, device=x.device)
    spec = torch.stft(x.reshape(-1, shape[-1]), cfg.n_fft, cfg.hop, cfg.n_fft, window, center=True,
                      pad_mode="constant", return_complex=True)
    return spec.reshape(*shape[:-1], *spec.shape[-2:])


def istft(spec: torch.Tensor, cfg: SpectrogramConfig, length: int | None = None) -> torch.Tensor:
    """Return the waves float32 [..., length] (default (frames - 1) * hop) of complex spectrograms [..., F, frames]."""
    shape = spec.shape
    window = torch.hann_window(cfg.n_fft, periodic=True, dtype=spec.real.dtype, device=spec.device)
    length = (shape[-1] - 1) * cfg.hop if length is None else length
    x = torch.istft(spec.reshape(-1, *shape[-2:]), cfg.n_fft, cfg.hop, cfg.n_fft, window, center=True,
                    length=length)
    return x.reshape(*shape[:-2], length)


def magnitude(wave, cfg: SpectrogramConfig) -> torch.Tensor:
    """Return |STFT| of waves [..., T]: float32 [..., n_fft // 2 + 1, 1 + T // hop], linear (not dB)."""
    return stft(wave, cfg).abs()


def mel_power(wave, cfg: SpectrogramConfig) -> torch.Tensor:
    """Return the mel power spectrogram of waves [..., T]: float32 [..., n_mels, 1 + T // hop], >= 0.

    The filter bank applied to |STFT|^2 (librosa.feature.melspectrogram's scale, power 2).
    """
    power = magnitude(wave, cfg).square()
    return _bank(cfg, power.device) @ power


def power_to_image(mel: torch.Tensor, cfg: SpectrogramConfig) -> torch.Tensor:
    """Return mel power [..., n_mels, frames] as float32 pixels in [-1, 1], same shape, highest band in row 0.

    10 * log10(power) in [max_db - top_db, max_db] maps linearly to [-1, 1]; levels outside are clamped.
    """
    db = 10.0 * torch.log10(mel.float().clamp_min(_AMIN))
    img = (db - cfg.max_db) * (2.0 / cfg.top_db) + 1.0
    return img.clamp(-1.0, 1.0).flip(-2)


def image_to_power(image: torch.Tensor, cfg: SpectrogramConfig) -> torch.Tensor:
    """Return pixels [..., n_mels, frames] in [-1, 1] (clamped) as mel power, float32, same shape, >= 0.

    The inverse of `power_to_image`; pixels at the floor (-1) become power 0 (silence).
    """
    img = image.float().clamp(-1.0, 1.0).flip(-2)
    power = torch.pow(10.0, ((img - 1.0) * (cfg.top_db / 2.0) + cfg.max_db) / 10.0)
    return torch.where(img > -1.0, power, torch.zeros_like(power))


def wave_to_image(wave, cfg: SpectrogramConfig | None = None) -> torch.Tensor:
    """Return clips [..., cfg.samples] as images float32 [..., 1, n_mels, frames] in [-1, 1] (NCHW for [N, T]).

    A clip must have exactly `cfg.samples` samples (cut or pad it with `audio.fit_length`).
    """
    cfg = cfg or SpectrogramConfig()
    x = _as_wave(wave)
    if x.ndim == 0 or x.shape[-1] != cfg.samples:
        got = "a scalar" if x.ndim == 0 else f"{x.shape[-1]} samples"
        raise ConfigError(f"a {cfg.frames}-frame spectrogram needs clips of {cfg.samples} samples "
                          f"({cfg.seconds:g} s at {cfg.sample_rate} Hz), got {got}; cut or pad the waves with "
                          "minidiffusion.data.audio.fit_length")
    return power_to_image(mel_power(x, cfg), cfg).unsqueeze(-3)


def mel_to_magnitude(mel: torch.Tensor, cfg: SpectrogramConfig, n_iter: int = 50) -> torch.Tensor:
    """Return the linear magnitude float32 [..., n_fft // 2 + 1, frames] >= 0 whose mel power best fits `mel`.

    Non-negative least squares min ||fb @ P - mel|| over the linear power P >= 0: the pseudo-inverse
    clamped at 0, then `n_iter` accelerated projected-gradient steps (FISTA, Beck & Teboulle 2009;
    0: the clamped pseudo-inverse alone); returns sqrt(P).
    """
    check_number("n_iter", n_iter, lo=0, hi=10000, integer=True)
    mel = mel.float()
    pinv, step = _pinv(cfg.sample_rate, cfg.n_fft, cfg.n_mels, float(cfg.fmin), float(cfg.fmax))
    fb = _bank(cfg, mel.device)
    power = (torch.from_numpy(pinv).to(mel.device) @ mel).clamp_min(0.0)
    ahead, t = power, 1.0
    for _ in range(n_iter):
        new = (ahead - step * (fb.T @ (fb @ ahead - mel))).clamp_min(0.0)
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        ahead = new + ((t - 1.0) / t_new) * (new - power)
        power, t = new, t_new
    return power.sqrt()


def griffin_lim(mag: torch.Tensor, cfg: SpectrogramConfig, n_iter: int = 32, momentum: float = 0.99,
                init: str = "random", seed: int = 0, length: int | None = None) -> torch.Tensor:
    """Return waves float32 [..., length] whose |STFT| approximates `mag` [..., n_fft // 2 + 1, frames].

    Griffin-Lim: `n_iter` rounds of keeping the phase of STFT(ISTFT(mag * phase)); with `momentum` > 0
    the fast variant of Perraudin et al. (2013), 0.99 as librosa.griffinlim. `init` 'random' (phases
    drawn with `seed`) or 'zeros' (zero phase). `length` defaults to (frames - 1) * hop.
    """
    check_number("n_iter", n_iter, lo=0, hi=10000, integer=True)
    check_number("momentum", momentum, lo=0, hi=1, hi_open=True)
    check_choice("init", init, ("random", "zeros"))
    mag = mag.float()
    if init == "random":
        gen = torch.Generator().manual_seed(seed)
        phase = torch.rand(mag.shape, generator=gen).to(mag.device) * (2 * math.pi)
        angles = torch.polar(torch.ones_like(mag), phase)
    else:
        angles = torch.ones_like(mag, dtype=torch.complex64)
    length = (mag.shape[-1] - 1) * cfg.hop if length is None else length
    eps = torch.finfo(torch.float32).tiny
    rebuilt = None
    for _ in range(n_iter):
        previous = rebuilt
        rebuilt = stft(istft(mag * angles, cfg, length), cfg)
        angles = rebuilt if previous is None or momentum == 0 else rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / (angles.abs() + eps)
    return istft(mag * angles, cfg, length)


def image_to_wave(image: torch.Tensor, cfg: SpectrogramConfig | None = None, n_iter: int = 32,
                  momentum: float = 0.99, seed: int = 0) -> torch.Tensor:
    """Return images [..., 1, n_mels, frames] in [-1, 1] as waves float32 [..., (frames - 1) * hop] in [-1, 1].

    Pixels -> mel power -> linear magnitude (`mel_to_magnitude`) -> `griffin_lim(n_iter, momentum, seed)`.
    The level the image encodes is kept; a wave that would exceed [-1, 1] is scaled down to a peak of 1.
    """
    cfg = cfg or SpectrogramConfig()
    if image.ndim < 3 or image.shape[-3] != 1 or image.shape[-2] != cfg.n_mels:
        raise ConfigError(f"expected spectrogram images [..., 1, {cfg.n_mels}, frames], got shape "
                          f"{list(image.shape)}")
    mag = mel_to_magnitude(image_to_power(image.squeeze(-3), cfg), cfg)
    wave = griffin_lim(mag, cfg, n_iter, momentum, seed=seed)
    peak = wave.abs().amax(-1, keepdim=True)
    return wave / peak.clamp_min(1.0)


def spectral_convergence(mag: torch.Tensor, wave, cfg: SpectrogramConfig) -> torch.Tensor:
    """Return ||mag - |STFT(wave)||| / ||mag|| (Frobenius, per item): float32 [...] >= 0; 0 is a perfect match.

    `mag` [..., n_fft // 2 + 1, frames] is the target magnitude; `wave` [..., T] its reconstruction.
    """
    mag = mag.float()
    rebuilt = magnitude(wave, cfg)
    if rebuilt.shape != mag.shape:
        raise ConfigError(f"the wave's spectrogram {list(rebuilt.shape)} does not match the target "
                          f"{list(mag.shape)}; give a wave of (frames - 1) * hop samples")
    return torch.linalg.vector_norm(mag - rebuilt, dim=(-2, -1)) / torch.linalg.vector_norm(mag, dim=(-2, -1))
