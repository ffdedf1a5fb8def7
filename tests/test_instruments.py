"""Instruments: the ten families, rendering one note (deterministic, in range, normalised), the pitch split, the note
draws, the cached set, and the refusals (a missing sound font or library, a note the font cannot play).

Tests that need Debian's sound font and FluidSynth FAIL (never skip) when they are missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minidiffusion.data import instruments as ins
from minidiffusion.data.audio import PEAK
from minidiffusion.data.spectrogram import SpectrogramConfig, wave_to_image
from minidiffusion.errors import ConfigError, DataError


@pytest.fixture(scope="session")
def synth():
    """FluidSynth with Debian's FluidR3 GM font loaded; FAILS (never skips) the test when either is missing."""
    try:
        s = ins.Synthesizer()
    except DataError as e:
        pytest.fail(f"instrument tests need FluidSynth and the GM sound font (`apt-get install libfluidsynth3 "
                    f"fluid-soundfont-gm`): {e}", pytrace=False)
    yield s
    s.close()


@pytest.fixture(autouse=True)
def cache_home(session_cache, monkeypatch) -> Path:
    """All tests share one session cache; returns its instruments folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(session_cache))
    return session_cache / "minidiffusion" / "instruments"


def test_ten_families_of_general_midi_programs():
    assert len(ins.FAMILIES) == 10 and ins.CLASS_NAMES == tuple(f.name for f in ins.FAMILIES)
    assert ins.CLASS_NAMES[0] == "piano" and {"organ", "guitar", "bass", "strings", "brass", "reed", "pipe",
                                              "synth lead", "chromatic percussion"} < set(ins.CLASS_NAMES)
    programs = [p for f in ins.FAMILIES for p in f.programs]
    assert len({p.number for p in programs}) == len(programs) and all(len(f.programs) >= 3 for f in ins.FAMILIES)
    blocks = {"piano": {0}, "chromatic percussion": {1}, "organ": {2}, "guitar": {3}, "bass": {4},
              "strings": {5, 6}, "brass": {7}, "reed": {8}, "pipe": {9}, "synth lead": {10}}
    for f in ins.FAMILIES:  # GM numbers its families in blocks of eight programs (strings and ensembles: 5, 6)
        assert {p.number // 8 for p in f.programs} <= blocks[f.name]
        assert all(0 <= p.low < p.high <= 127 and p.high - p.low >= 17 for p in f.programs)
    assert round(ins.SECONDS * ins.SAMPLE_RATE) == SpectrogramConfig().samples  # a 128-frame spectrogram


def test_a_note_is_normalised_faded_and_deterministic(synth):
    x = ins.render_note(0, 60, 100, synth=synth)
    assert x.dtype == np.float32 and x.shape == (32512,)
    assert float(np.abs(x).max()) == pytest.approx(PEAK) and abs(float(x[-1])) < 1e-6  # faded out
    ins.render_note(49, 72, 40, synth=synth)  # another note between: the next render must not depend on it
    assert np.array_equal(ins.render_note(0, 60, 100, synth=synth), x)
    assert not np.allclose(ins.render_note(0, 62, 100, synth=synth), x, atol=1e-3)
    assert not np.array_equal(ins.render_note(0, 60, 50, synth=synth), x)
    short = ins.render_note(0, 60, 100, seconds=1.0, sample_rate=22050)  # its own synthesiser at 22.05 kHz
    assert short.shape == (22050,)
    img = wave_to_image(x)
    assert img.shape == (1, 128, 128) and float(img.max()) > 0  # the note shows in its spectrogram


def test_every_program_sounds_across_its_range(synth):
    for f in ins.FAMILIES:
        for p in f.programs:
            for pitch in (p.low, p.high):
                x = ins.render_note(p.number, pitch, ins.VELOCITIES[0], seconds=0.3, synth=synth)
                assert np.isfinite(x).all() and float(np.abs(x).max()) == pytest.approx(PEAK), (p, pitch)


def test_a_note_the_font_cannot_play_is_refused(synth):
    with pytest.raises(DataError, match=r"GM program 40 \(Violin\) at MIDI pitch 94, velocity 64 renders silence from "
                                        r".*FluidR3_GM.sf2; choose a pitch the sound font covers"):
        ins.render_note(40, 94, 64, synth=synth)
    for kw, msg in (({"pitch": 128}, "pitch must be an integer in 0..127, got 128"),
                    ({"velocity": 0}, "velocity must be an integer in 1..127, got 0"),
                    ({"program": -1}, "program must be an integer in 0..127")):
        with pytest.raises(ConfigError, match=msg):
            ins.render_note(**{"program": 0, "pitch": 60, "velocity": 64, **kw}, synth=synth)


def test_a_missing_sound_font_or_library_is_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"sound font .*none.sf2 does not exist; install it with "
                                        r"`apt-get install fluid-soundfont-gm`"):
        ins.load_instruments(n_per_class=1, sound_font=tmp_path / "none.sf2")
    (tmp_path / "fake.sf2").write_bytes(b"RIFF\0\0\0\0WAVEfmt ")
    with pytest.raises(DataError, match=r"fake.sf2 is not a SoundFont 2 \(.sf2\) file"):
        ins.Synthesizer(sound_font=tmp_path / "fake.sf2")
    monkeypatch.setattr(ins.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(f"{name}: not found")))
    ins._fluidsynth.cache_clear()
    try:
        with pytest.raises(DataError, match=r"FluidSynth's library \(libfluidsynth\) is not installed; install it "
                                            r"with `apt-get install libfluidsynth3 fluid-soundfont-gm`"):
            ins.Synthesizer()
    finally:
        monkeypatch.undo()
        ins._fluidsynth.cache_clear()


def test_the_pitch_split_holds_out_pitches_per_program():
    split = ins.pitch_split()
    assert split == ins.pitch_split() and split != ins.pitch_split(split_seed=1)
    for f in ins.FAMILIES:
        for p in f.programs:
            train, test = split[p.number]
            assert sorted(train + test) == list(range(p.low, p.high + 1)) and not set(train) & set(test)
            assert len(test) == max(1, round(0.2 * (p.high - p.low + 1)))
    assert all(len(test) == 0 for _, test in ins.pitch_split(test_pct=0).values())


def test_notes_are_drawn_per_split_class_and_index():
    notes = ins.draw_notes("train", 20)
    assert len(notes) == 200 and [n.family for n in notes[:12]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert notes == ins.draw_notes("train", 20) and ins.draw_notes("train", 5) == notes[:50]  # larger sets extend
    assert notes != ins.draw_notes("train", 20, seed=1)
    split, test = ins.pitch_split(), ins.draw_notes("test", 20)
    programs = {p.number: c for c, f in enumerate(ins.FAMILIES) for p in f.programs}
    for side, drawn in ((0, notes), (1, test)):
        for n in drawn:
            assert programs[n.program] == n.family and n.pitch in split[n.program][side]
            assert ins.VELOCITIES[0] <= n.velocity <= ins.VELOCITIES[1]
    assert len({n.program for n in notes}) > 30 and len({n.velocity for n in notes}) > 50
    for kw, msg in (({"split": "valid"}, "split must be one of train, test"), ({"n_per_class": 0}, "n_per_class"),
                    ({"split": "test", "test_pct": 0}, "no test split")):
        with pytest.raises(ConfigError, match=msg):
            ins.draw_notes(**kw)


def test_the_set_is_rendered_once_then_cached(synth, cache_home):
    start = time.perf_counter()
    waves, labels, names = ins.load_instruments("train", n_per_class=6)
    first = time.perf_counter() - start
    assert waves.shape == (60, 32512) and waves.dtype == torch.float32 and labels.dtype == torch.int64
    assert names == list(ins.CLASS_NAMES) and labels.tolist() == list(range(10)) * 6
    assert torch.allclose(waves.abs().amax(1), torch.tensor(PEAK))
    assert len(list(cache_home.glob("*.safetensors"))) == 1
    start = time.perf_counter()
    again, labels2, _ = ins.load_instruments("train", n_per_class=6)
    assert torch.equal(again, waves) and torch.equal(labels2, labels)
    assert time.perf_counter() - start < first
    fresh, _, _ = ins.load_instruments("train", n_per_class=6, cache=False)
    assert torch.equal(fresh, waves)  # what the cache holds is what rendering gives
    notes = ins.draw_notes("train", 6)
    assert np.array_equal(waves[7].numpy(), ins.render_note(*notes[7][1:], synth=synth))
    other, _, _ = ins.load_instruments("train", n_per_class=6, seed=1)
    test, test_labels, _ = ins.load_instruments("test", n_per_class=2)
    assert not torch.equal(other, waves) and test.shape == (20, 32512) and test_labels.tolist() == list(range(10)) * 2
    assert len(list(cache_home.glob("*.safetensors"))) == 3
    with pytest.raises(ConfigError, match="sample_rate must be an integer in 8000..96000"):
        ins.load_instruments(sample_rate=4000)
