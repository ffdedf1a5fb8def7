"""Instruments: single notes of ten General MIDI instrument families, rendered offline with FluidSynth.

Each clip is one note of a GM program from Debian's FluidR3 sound font (package `fluid-soundfont-gm`)
synthesised by FluidSynth's library (package `libfluidsynth3`, called through `ctypes`): the key is
pressed at time 0 with a random velocity (32..127), held for 3/4 of the clip and released; the clip
ends with a 50 ms fade-out and is peak-normalised to `audio.PEAK`. Reverb and chorus are off. The
pitch is random within the program's natural range (`Program.low..high`, MIDI note numbers, also
within what the sound font covers). The ten classes are instrument families (`FAMILIES`: 'piano',
'chromatic percussion', 'organ', 'guitar', 'bass', 'strings', 'brass', 'reed', 'pipe', 'synth lead'),
each a few GM programs of that family; a clip is as likely to come from any program of its family.

The default clip is 2.032 s at 16 kHz (32512 samples), the length whose spectrogram with
`spectrogram.SpectrogramConfig()` (hop 256) has exactly 128 frames. Every note is rendered by a
fresh synthesiser sharing the loaded sound font, so a note's samples depend only on its program,
pitch, velocity and length, never on the notes before it: a seed gives the same waves in any order.

The train/test split holds out pitches: for each program, `test_pct` of its range (at least one
key), chosen by a permutation seeded with `split_seed`, sounds only in the test set, so a test note
is never the training program at a training pitch. Notes are drawn per (split, class, index) from
`seed`, so a larger `n_per_class` extends a set rather than changing it. The rendered float32 waves
are cached in `$XDG_CACHE_HOME/minidiffusion/instruments/<key>.safetensors`, the key hashing the
sound font's bytes, FluidSynth's version, the rate, the length and the notes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..config import check_choice, check_number
from ..errors import ConfigError, DataError, OutputError
from ..paths import cache_dir, save_safetensors, sha256_file
from .audio import PEAK

__all__ = ["SOUND_FONT", "SAMPLE_RATE", "SECONDS", "HOLD", "VELOCITIES", "Program", "Family", "FAMILIES",
           "CLASS_NAMES", "Note", "Synthesizer", "render_note", "pitch_split", "draw_notes", "load_instruments"]

SOUND_FONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")  # apt-get install fluid-soundfont-gm
SAMPLE_RATE = 16000  # Hz
SECONDS = 2.032  # 32512 samples at 16 kHz = 127 hops of 256: a 128-frame spectrogram
HOLD = 0.75  # the fraction of the clip the key is held; the rest is the release
VELOCITIES = (32, 127)  # MIDI velocities drawn (inclusive): soft to loudest
_FADE_SECONDS = 0.05  # the raised-cosine fade-out that ends every clip (no click where a release is cut)
_GAIN = 0.5  # FluidSynth's output gain: floats are not clipped, and every clip is peak-normalised anyway
_RAW_SILENCE = 1e-6  # a rendered peak below this means the sound font has no sample there
_CACHE_VERSION = 1  # bump when rendering changes, so old caches are not reused
_INSTALL = "`apt-get install libfluidsynth3 fluid-soundfont-gm`"


class Program(NamedTuple):
    """A General MIDI program: its number (0-based: GM's '1 Acoustic Grand Piano' is 0), name, and the MIDI
    pitches (note numbers, 60 = middle C) it is played at."""

    number: int
    name: str
    low: int
    high: int


class Family(NamedTuple):
    """A class: an instrument family's name (the label) and its GM programs."""

    name: str
    programs: tuple[Program, ...]


FAMILIES: tuple[Family, ...] = (
    Family("piano", (Program(0, "Acoustic Grand Piano", 28, 96), Program(1, "Bright Acoustic Piano", 28, 96),
                     Program(2, "Electric Grand Piano", 28, 96))),
    Family("chromatic percussion", (Program(8, "Celesta", 60, 96), Program(9, "Glockenspiel", 79, 108),
                                    Program(10, "Music Box", 60, 96), Program(11, "Vibraphone", 53, 89),
                                    Program(12, "Marimba", 45, 96), Program(13, "Xylophone", 65, 96),
                                    Program(14, "Tubular Bells", 60, 77))),
    Family("organ", (Program(16, "Drawbar Organ", 36, 96), Program(17, "Percussive Organ", 36, 96),
                     Program(18, "Rock Organ", 36, 96), Program(19, "Church Organ", 36, 91))),
    Family("guitar", (Program(24, "Acoustic Guitar (nylon)", 40, 84), Program(25, "Acoustic Guitar (steel)", 40, 84),
                      Program(26, "Electric Guitar (jazz)", 40, 84), Program(27, "Electric Guitar (clean)", 40, 84))),
    Family("bass", (Program(32, "Acoustic Bass", 28, 55), Program(33, "Electric Bass (finger)", 28, 60),
                    Program(34, "Electric Bass (pick)", 28, 60), Program(35, "Fretless Bass", 28, 60))),
    Family("strings", (Program(40, "Violin", 55, 93), Program(41, "Viola", 48, 84), Program(42, "Cello", 36, 72),
                       Program(48, "String Ensemble 1", 36, 91), Program(49, "String Ensemble 2", 36, 91))),
    Family("brass", (Program(56, "Trumpet", 54, 82), Program(57, "Trombone", 40, 72), Program(58, "Tuba", 28, 58),
                     Program(60, "French Horn", 34, 77), Program(61, "Brass Section", 36, 84))),
    Family("reed", (Program(64, "Soprano Sax", 56, 87), Program(65, "Alto Sax", 49, 80),
                    Program(66, "Tenor Sax", 44, 75), Program(67, "Baritone Sax", 36, 68), Program(68, "Oboe", 58, 91),
                    Program(70, "Bassoon", 34, 72), Program(71, "Clarinet", 50, 91))),
    Family("pipe", (Program(72, "Piccolo", 74, 102), Program(73, "Flute", 60, 96), Program(74, "Recorder", 60, 91),
                    Program(75, "Pan Flute", 60, 96), Program(79, "Ocarina", 60, 84))),
    Family("synth lead", (Program(80, "Lead 1 (square)", 36, 96), Program(81, "Lead 2 (sawtooth)", 36, 96),
                          Program(84, "Lead 5 (charang)", 36, 96), Program(87, "Lead 8 (bass + lead)", 36, 84))),
)
CLASS_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
_PROGRAMS = {p.number: p for f in FAMILIES for p in f.programs}


class Note(NamedTuple):
    """One clip to render: its class (index into FAMILIES), GM program number, MIDI pitch and velocity."""

    family: int
    program: int
    pitch: int
    velocity: int


# --- FluidSynth's C API, the dozen functions used (FluidSynth 2.x, libfluidsynth.so.3) ---

@lru_cache(maxsize=1)
def _fluidsynth() -> tuple[ctypes.CDLL, str]:
    """(the FluidSynth library with the prototypes used here, its version 'major.minor.micro'); its log is
    silenced (its errors become sentences here)."""
    lib = None
    for name in ("libfluidsynth.so.3", ctypes.util.find_library("fluidsynth")):
        if name:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
    if lib is None:
        raise DataError(f"FluidSynth's library (libfluidsynth) is not installed; install it with {_INSTALL}")
    P, I, D, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_char_p
    for name, res, args in (
            ("fluid_version", None, [ctypes.POINTER(I)] * 3), ("fluid_set_log_function", P, [I, P, P]),
            ("new_fluid_settings", P, []), ("delete_fluid_settings", None, [P]),
            ("fluid_settings_setnum", I, [P, S, D]), ("fluid_settings_setint", I, [P, S, I]),
            ("new_fluid_synth", P, [P]), ("delete_fluid_synth", None, [P]), ("fluid_synth_sfload", I, [P, S, I]),
            ("fluid_synth_get_sfont_by_id", P, [P, I]), ("fluid_synth_add_sfont", I, [P, P]),
            ("fluid_synth_remove_sfont", I, [P, P]), ("fluid_synth_program_select", I, [P, I, I, I, I]),
            ("fluid_synth_noteon", I, [P, I, I, I]), ("fluid_synth_noteoff", I, [P, I, I]),
            ("fluid_synth_write_float", I, [P, I, P, I, I, P, I, I])):
        try:
            f = getattr(lib, name)
        except AttributeError:
            raise DataError(f"the FluidSynth library found has no {name}(), so it is not FluidSynth 2; install "
                            f"{_INSTALL}") from None
        f.restype, f.argtypes = res, args
    major, minor, micro = I(), I(), I()
    lib.fluid_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(micro))
    if major.value < 2:
        raise DataError(f"FluidSynth {major.value}.{minor.value} is too old (2.x is needed); install {_INSTALL}")
    for level in (1, 2, 3, 4):  # FLUID_ERR, WARN, INFO, DBG
        lib.fluid_set_log_function(level, None, None)
    return lib, f"{major.value}.{minor.value}.{micro.value}"


def _check_sound_font(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"sound font {path} does not exist; install it with `apt-get install fluid-soundfont-gm` "
                        "or pass sound_font= the path of a General MIDI .sf2 file")
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"sfbk":
        raise DataError(f"{path} is not a SoundFont 2 (.sf2) file; pass sound_font= a General MIDI .sf2 such as "
                        f"{SOUND_FONT} (`apt-get install fluid-soundfont-gm`)")
    return path


class Synthesizer:
    """FluidSynth at `sample_rate` Hz with one General MIDI sound font loaded (about 0.2-1 s), rendering single
    notes; use as a context manager or call `close()` to free the samples (FluidR3: about 150 MB).

    Each note gets a fresh synthesiser sharing the loaded font (reverb and chorus off), so a note's
    samples do not depend on the notes rendered before it.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, sound_font: str | Path | None = None):
        check_number("sample_rate", sample_rate, lo=8000, hi=96000, integer=True)  # FluidSynth's range
        self.sample_rate = sample_rate
        self.sound_font = _check_sound_font(Path(sound_font) if sound_font is not None else SOUND_FONT)
        self._lib = lib = _fluidsynth()[0]
        self._settings = lib.new_fluid_settings()
        self._owner = self._sfont = None
        try:
            for key, value in (("synth.sample-rate", float(sample_rate)), ("synth.gain", _GAIN)):
                if lib.fluid_settings_setnum(self._settings, key.encode(), value) != 0:
                    raise DataError(f"FluidSynth refused {key}={value}")
            for key, value in (("synth.reverb.active", 0), ("synth.chorus.active", 0), ("synth.cpu-cores", 1),
                               ("synth.polyphony", 64)):
                lib.fluid_settings_setint(self._settings, key.encode(), value)
            self._owner = lib.new_fluid_synth(self._settings)
            if not self._owner:
                raise DataError(f"FluidSynth could not start at {sample_rate} Hz; reinstall {_INSTALL}")
            sfid = lib.fluid_synth_sfload(self._owner, str(self.sound_font).encode(), 0)
            if sfid < 0:
                raise DataError(f"FluidSynth cannot load the sound font {self.sound_font}; reinstall it with "
                                "`apt-get install --reinstall fluid-soundfont-gm` or pass another .sf2")
            self._sfont = lib.fluid_synth_get_sfont_by_id(self._owner, sfid)
        except BaseException:
            self.close()
            raise

    def render(self, program: int, pitch: int, velocity: int, n_samples: int, hold: int) -> np.ndarray:
        """Return the note as float32 [n_samples], FluidSynth's raw level (mono: the mean of left and right).

        The key goes down at sample 0 and up at sample `hold`; the release sounds until the end.
        """
        if self._sfont is None:
            raise DataError("this Synthesizer is closed; make a new one")
        lib = self._lib
        synth = lib.new_fluid_synth(self._settings)
        if not synth:
            raise DataError(f"FluidSynth could not start a synthesiser; reinstall {_INSTALL}")
        try:
            sfid = lib.fluid_synth_add_sfont(synth, self._sfont)
            if sfid < 0 or lib.fluid_synth_program_select(synth, 0, sfid, 0, program) != 0:
                raise DataError(f"the sound font {self.sound_font} has no General MIDI program {program} (bank 0); "
                                "pass a General MIDI .sf2 such as FluidR3_GM.sf2 "
                                "(`apt-get install fluid-soundfont-gm`)")
            buf = np.zeros((n_samples, 2), np.float32)  # interleaved left, right
            ptr = buf.ctypes.data
            lib.fluid_synth_noteon(synth, 0, pitch, velocity)
            lib.fluid_synth_write_float(synth, hold, ptr, 0, 2, ptr, 1, 2)
            lib.fluid_synth_noteoff(synth, 0, pitch)
            tail = ptr + hold * buf.strides[0]
            lib.fluid_synth_write_float(synth, n_samples - hold, tail, 0, 2, tail, 1, 2)
        finally:
            lib.fluid_synth_remove_sfont(synth, self._sfont)  # the owner keeps (and frees) the font
            lib.delete_fluid_synth(synth)
        return buf.mean(axis=1)

    def close(self) -> None:
        """Free the synthesiser and its samples (safe to call twice)."""
        lib = self._lib
        if self._owner:
            lib.delete_fluid_synth(self._owner)
        if self._settings:
            lib.delete_fluid_settings(self._settings)
        self._owner = self._sfont = self._settings = None

    def __enter__(self) -> Synthesizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _n_samples(seconds: float, sample_rate: int) -> int:
    check_number("seconds", seconds, lo=0.1, hi=60)
    return round(seconds * sample_rate)


def render_note(program: int, pitch: int, velocity: int, seconds: float = SECONDS, sample_rate: int = SAMPLE_RATE,
                *, sound_font: str | Path | None = None, synth: Synthesizer | None = None) -> np.ndarray:
    """Return one note as float32 [round(seconds * sample_rate)] in [-1, 1], peak-normalised to audio.PEAK.

    GM `program` (0..127), MIDI `pitch` (0..127, 60 = middle C) and `velocity` (1..127); the key is held
    for `HOLD` of the clip, which ends with a 50 ms fade-out. Pass a `Synthesizer` to render many notes
    without loading the sound font each time (its rate wins over `sample_rate`). A note the sound font
    has no sound for raises DataError.
    """
    check_number("program", program, lo=0, hi=127, integer=True)
    check_number("pitch", pitch, lo=0, hi=127, integer=True)
    check_number("velocity", velocity, lo=1, hi=127, integer=True)
    if synth is None:
        with Synthesizer(sample_rate, sound_font) as own:
            return render_note(program, pitch, velocity, seconds, sample_rate, synth=own)
    n = _n_samples(seconds, synth.sample_rate)
    wave = synth.render(program, pitch, velocity, n, int(n * HOLD))
    peak = float(np.abs(wave).max())
    if not peak >= _RAW_SILENCE:
        name = f" ({_PROGRAMS[program].name})" if program in _PROGRAMS else ""
        raise DataError(f"GM program {program}{name} at MIDI pitch {pitch}, velocity {velocity} renders silence from "
                        f"{synth.sound_font}; choose a pitch the sound font covers (FAMILIES lists each program's "
                        "range)")
    fade = min(n, round(_FADE_SECONDS * synth.sample_rate))
    wave[n - fade:] *= (0.5 + 0.5 * np.cos(np.linspace(0, np.pi, fade))).astype(np.float32)
    return wave * np.float32(PEAK / peak)


def pitch_split(test_pct: float = 0.2, split_seed: int = 0) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Return {GM program: (train pitches, test pitches)}, each sorted: per program, a permutation seeded with
    (`split_seed`, program) holds out round(test_pct * its range) pitches (at least one when test_pct > 0)."""
    check_number("test_pct", test_pct, lo=0, hi=1, hi_open=True)
    check_number("split_seed", split_seed, lo=0, integer=True)
    out = {}
    for prog in _PROGRAMS.values():
        pitches = np.arange(prog.low, prog.high + 1)
        n_test = max(1, round(test_pct * len(pitches))) if test_pct > 0 else 0
        perm = np.random.default_rng([split_seed, prog.number]).permutation(pitches)
        out[prog.number] = (tuple(sorted(perm[n_test:].tolist())), tuple(sorted(perm[:n_test].tolist())))
    return out


def draw_notes(split: str = "train", n_per_class: int = 200, seed: int = 0, test_pct: float = 0.2,
               split_seed: int = 0) -> list[Note]:
    """Return the notes of `split` ('train' or 'test'): n_per_class per family, interleaved (classes 0..9, 0..9, ...).

    Note i of class c comes from a generator seeded with (seed, split, c, i): a program of the family
    uniformly, a pitch of that program's side of `pitch_split(test_pct, split_seed)`, a velocity in VELOCITIES.
    """
    check_choice("split", split, ("train", "test"))
    check_number("n_per_class", n_per_class, lo=1, hi=1_000_000, integer=True)
    check_number("seed", seed, lo=0, integer=True)
    if split == "test" and test_pct == 0:
        raise ConfigError("test_pct=0 holds no pitch out, so there is no test split; use test_pct > 0")
    side = 0 if split == "train" else 1
    pitches = pitch_split(test_pct, split_seed)
    notes = []
    for i in range(n_per_class):
        for c, family in enumerate(FAMILIES):
            rng = np.random.default_rng([seed, side, c, i])
            prog = family.programs[int(rng.integers(len(family.programs)))]
            choices = pitches[prog.number][side]
            notes.append(Note(c, prog.number, int(choices[int(rng.integers(len(choices)))]),
                              int(rng.integers(VELOCITIES[0], VELOCITIES[1] + 1))))
    return notes


@lru_cache(maxsize=4)
def _font_hash(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _cache_path(notes: list[Note], sound_font: Path, sample_rate: int, n: int, lib_version: str) -> Path:
    st = sound_font.stat()
    settings = [_CACHE_VERSION, _font_hash(str(sound_font.resolve()), st.st_size, st.st_mtime_ns), lib_version,
                sample_rate, n, int(n * HOLD), _FADE_SECONDS, PEAK, _GAIN, [list(x) for x in notes]]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:32]
    return cache_dir("instruments") / f"{key}.safetensors"


def load_instruments(split: str = "train", n_per_class: int = 200, seed: int = 0, sample_rate: int = SAMPLE_RATE,
                     seconds: float = SECONDS, sound_font: str | Path | None = None, cache: bool = True,
                     test_pct: float = 0.2, split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Return (waves float32 [N, T] in [-1, 1], labels int64 [N] in 0..9, the ten class names), N = 10 * n_per_class,
    T = round(seconds * sample_rate): the notes of `draw_notes(split, n_per_class, seed, test_pct, split_seed)`.

    Rendered once (about 1.5 ms a note), then read from the cache; `cache=False` neither reads nor writes it.
    """
    from safetensors import safe_open

    check_number("sample_rate", sample_rate, lo=8000, hi=96000, integer=True)
    n = _n_samples(seconds, sample_rate)
    notes = draw_notes(split, n_per_class, seed, test_pct, split_seed)
    font = _check_sound_font(Path(sound_font) if sound_font is not None else SOUND_FONT)
    path = _cache_path(notes, font, sample_rate, n, _fluidsynth()[1])
    labels = torch.tensor([x.family for x in notes], dtype=torch.int64)
    if cache and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                waves = f.get_tensor("waves")
            if waves.shape == (len(notes), n):
                return waves, labels, list(CLASS_NAMES)
        except Exception:  # a damaged cache is a cache miss; it is rewritten below
            pass
    waves = np.empty((len(notes), n), np.float32)
    with Synthesizer(sample_rate, font) as synth:
        for i, x in enumerate(notes):
            waves[i] = render_note(x.program, x.pitch, x.velocity, seconds, synth=synth)
    result = torch.from_numpy(waves)
    if cache:
        try:
            meta = {"notes": json.dumps([list(x) for x in notes]), "sample_rate": str(sample_rate)}
            save_safetensors({"waves": result, "labels": labels}, path, metadata=meta)
        except OutputError as e:
            warnings.warn(f"could not write the instrument cache ({e}); the notes will be rendered again next time",
                          stacklevel=2)
    return result, labels, list(CLASS_NAMES)

