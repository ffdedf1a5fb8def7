"""Emoji: parsing emoji-test.txt, one glyph per flag / ZWJ sequence, the render, labels, the family split, the cache.

The real set is rendered once per session (several seconds) into a session-wide cache; every other test
reads it from there. Tests that need Debian's font or list FAIL (never skip) when they are missing.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch

from minidiffusion.data import emoji as em
from minidiffusion.errors import ConfigError, DataError

N_EMOJI, GROUPS, N_SUBGROUPS = 3655, 9, 99  # Debian 12: unicode-data 15.0, fonts-noto-color-emoji 2.042
SYNTHETIC = """\
# group: Food & Drink

# subgroup: food-fruit
1F34E                                                  ; fully-qualified     # 🍎 E0.6 red apple
1F34F ; fully-qualified # 🍏 green apple
2764 ; unqualified # ❤ E0.6 red heart

# subgroup: food-sweet
1F370                                                  ; fully-qualified     # 🍰 E0.6 shortcake

# group: People & Body

# subgroup: hand-fingers-open
1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FD                                            ; fully-qualified     # 👋🏽 E1.0 waving hand: medium skin tone
1F469 200D 1F4BB                                       ; fully-qualified     # 👩‍💻 E4.0 woman technologist
1F1EF 1F1F5                                            ; fully-qualified     # 🇯🇵 E0.6 flag: Japan
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone
"""


def _need(what: str, package: str, call):
    """Return call(); FAIL the test with a sentence naming the Debian package when it raises DataError."""
    try:
        return call()
    except DataError as e:
        problem = str(e)
    pytest.fail(f"emoji tests need {what} (`apt-get install {package}`): {problem}", pytrace=False)


@pytest.fixture(scope="session")
def emoji_font():
    """Debian's Noto Color Emoji font, opened; FAILS (never skips) the test when it is missing."""
    return _need("the Noto Color Emoji font", "fonts-noto-color-emoji", em.open_emoji_font)


@pytest.fixture(scope="session")
def emoji_list() -> list[em.Emoji]:
    """The fully-qualified emoji of Debian's emoji-test.txt; FAILS (never skips) the test when it is missing."""
    return _need("Unicode's emoji-test.txt", "unicode-data", em.parse_emoji_test)


@pytest.fixture(autouse=True)
def cache_home(session_cache, monkeypatch) -> Path:
    """All tests share one session cache (the real render is done once); returns its emoji folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(session_cache))
    return session_cache / "minidiffusion" / "emoji"


@pytest.fixture(scope="session")
def real_set(emoji_font, emoji_list, session_cache) -> em.EmojiSet:
    """The whole real set at 64 px, rendered into the session cache (treat as read-only)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("XDG_CACHE_HOME", str(session_cache))
        start = time.perf_counter()
        full = em.load_emoji("all")
        assert time.perf_counter() - start < 60, "rendering the emoji should take well under a minute"
    return full


@pytest.fixture
def synthetic(tmp_path) -> Path:
    path = tmp_path / "emoji-test.txt"
    path.write_text(SYNTHETIC, encoding="utf-8")
    return path


# -- parsing and errors (no Debian data needed) ---------------------------------------------------
def test_parse_names_groups_subgroups(synthetic):
    found = em.parse_emoji_test(synthetic)
    assert [e.name for e in found] == ["red apple", "green apple", "shortcake", "waving hand",
                                       "waving hand: medium skin tone", "woman technologist", "flag: Japan"]
    assert [e.group for e in found] == ["Food & Drink"] * 3 + ["People & Body"] * 4
    assert [e.subgroup for e in found][:4] == ["food-fruit", "food-fruit", "food-sweet", "hand-fingers-open"]
    assert found[4].code == "1F44B 1F3FD" and found[4].chars == "\U0001F44B\U0001F3FD"
    assert [e.name for e in em.parse_emoji_test(synthetic, "component")] == ["light skin tone"]


def test_missing_or_wrong_list_names_the_package(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install unicode-data"):
        em.parse_emoji_test(tmp_path / "missing.txt")
    (tmp_path / "other.txt").write_text("# just a comment\n")
    with pytest.raises(DataError, match="not an emoji-test.txt"):
        em.parse_emoji_test(tmp_path / "other.txt")


def test_missing_or_broken_font_names_the_package(tmp_path, synthetic):
    with pytest.raises(DataError, match=r"apt-get install fonts-noto-color-emoji"):
        em.load_emoji(font=tmp_path / "missing.ttf", emoji_list=synthetic)
    (tmp_path / "junk.ttf").write_bytes(b"not a font")
    with pytest.raises(DataError, match="cannot be opened as a colour emoji font.*fonts-noto-color-emoji"):
        em.open_emoji_font(tmp_path / "junk.ttf")


def test_missing_raqm_is_one_sentence(tmp_path, monkeypatch):
    from PIL import features

    (tmp_path / "font.ttf").write_bytes(b"")
    monkeypatch.setattr(features, "check", lambda name: name != "raqm")
    with pytest.raises(DataError, match="raqm.*apt-get install libfribidi0"):
        em.open_emoji_font(tmp_path / "font.ttf")


def test_bad_settings_raise_config_errors(synthetic):
    for kwargs in ({"split": "valid"}, {"image_size": 0}, {"background": (255, 255)}, {"background": (0, 0, 256)}):
        with pytest.raises(ConfigError):
            em.load_emoji(**kwargs, emoji_list=synthetic)


# -- rendering ------------------------------------------------------------------------------------
def _alpha_width(rgba) -> int:
    """Width of the drawn (non-transparent) part of an RGBA [H, W, 4] array."""
    cols = (rgba[..., 3] > 0).any(axis=0).nonzero()[0]
    return int(cols[-1] - cols[0] + 1)


@pytest.mark.integration
def test_flags_and_zwj_sequences_are_one_glyph(emoji_font):
    from PIL import ImageFont

    apple = em.render_glyph("\U0001F34E", emoji_font)
    assert apple.shape == (128, 136, 4) and apple.dtype.name == "uint8"
    for code in ("1F469 200D 1F4BB", "1F468 200D 1F469 200D 1F467 200D 1F466", "1F1EF 1F1F5",
                 "1F3F4 E0067 E0062 E0065 E006E E0067 E007F", "1F3F3 FE0F 200D 1F308"):
        glyph = em.render_glyph(em.Emoji(code, "", "", "").chars, emoji_font)
        assert glyph.shape == (128, 136, 4) and 90 < _alpha_width(glyph) <= 136, code
    basic = ImageFont.truetype(str(em.EMOJI_FONT), em.FONT_SIZE, layout_engine=ImageFont.Layout.BASIC)
    split = em.render_glyph(em.Emoji("1F469 200D 1F4BB", "", "", "").chars, basic)
    assert _alpha_width(split) > 200  # what the check guards against: two glyphs side by side


@pytest.mark.integration
def test_synthetic_render_background_and_unknown_sequences(emoji_font, synthetic, tmp_path):
    white = em.load_emoji("all", image_size=16, emoji_list=synthetic)
    assert white.images.shape == (7, 3, 16, 16) and white.images.dtype == torch.uint8
    assert white.images[:, :, 0, 0].eq(255).all() and white.images.float().mean() < 240
    black = em.load_emoji("all", image_size=16, background=(0, 0, 0), emoji_list=synthetic)
    assert black.images[:, :, 0, 0].eq(0).all()
    assert white.group_names == ["Food & Drink", "People & Body"]
    assert white.labels("subgroup").tolist() == [0, 0, 1, 2, 2, 2, 2]
    unknown = tmp_path / "unknown.txt"  # a ZWJ sequence no font has: drawn as two apples, so left out
    unknown.write_text(SYNTHETIC + "1F34E 200D 1F34E ; fully-qualified # x E99.0 apple apple\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="1 emoji .*'apple apple'.* not single glyphs"):
        assert len(em.load_emoji("all", image_size=16, emoji_list=unknown)) == 7


@pytest.mark.integration
def test_real_counts_shapes_and_range(real_set):
    assert len(real_set) == N_EMOJI and real_set.images.shape == (N_EMOJI, 3, 64, 64)
    assert real_set.images.dtype == torch.uint8 and real_set.images.is_contiguous()
    assert len(real_set.group_names) == GROUPS and len(real_set.subgroup_names) == N_SUBGROUPS
    assert real_set.group_names[0] == "Smileys & Emotion" and real_set.group_names[-1] == "Flags"
    assert "Component" not in real_set.group_names  # skin tones and hair styles are not emoji on their own
    i = real_set.names.index("red apple")
    assert (real_set.groups[i], real_set.subgroups[i]) == ("Food & Drink", "food-fruit")
    x = real_set.images
    assert int(x.min()) == 0 and int(x.max()) == 255
    assert x[:, :, 0, 0].eq(255).all()  # white corners
    drawn = (255 - x.float()).sum(dim=1).gt(30).float().mean(dim=(1, 2))  # fraction of non-white pixels
    assert drawn.min() > 0.03  # every image holds a drawn emoji (the smallest: "white small square")
    labels = real_set.labels("group")
    assert labels.dtype == torch.int64 and torch.bincount(labels).min() > 50
    assert real_set.labels("subgroup").max() == N_SUBGROUPS - 1
    with pytest.raises(ConfigError, match="kind"):
        real_set.labels("name")


@pytest.mark.integration
def test_cache_hit_is_fast_and_identical(real_set, cache_home, monkeypatch):
    def must_not_render(*args):
        raise AssertionError("a cache hit must not render")
    monkeypatch.setattr(em, "_render_all", must_not_render)
    start = time.perf_counter()
    again = em.load_emoji("all")
    assert time.perf_counter() - start < 1.0
    assert torch.equal(again.images, real_set.images) and again.names == real_set.names
    assert again.subgroup_names == real_set.subgroup_names


@pytest.mark.integration
def test_damaged_cache_is_rebuilt(emoji_font, synthetic, cache_home):
    before = set(cache_home.glob("*.safetensors"))
    first = em.load_emoji("all", image_size=8, emoji_list=synthetic)
    (entry,) = set(cache_home.glob("*.safetensors")) - before
    entry.write_bytes(b"truncated")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(em.load_emoji("all", image_size=8, emoji_list=synthetic).images, first.images)
    assert entry.stat().st_size > 100
    em.load_emoji("all", image_size=8, emoji_list=synthetic, cache=False)
    assert len(set(cache_home.glob("*.safetensors")) - before) == 1


# -- the split ------------------------------------------------------------------------------------
@pytest.mark.integration
def test_split_is_deterministic_and_keeps_variant_families_together(emoji_list):
    codes, names = [e.code for e in emoji_list], [e.name for e in emoji_list]
    train, test = em.emoji_split(codes, names)
    assert torch.equal(torch.sort(torch.cat([train, test])).values, torch.arange(len(codes)))
    assert 0.09 < len(test) / len(codes) < 0.12
    again = em.emoji_split(codes, names)
    assert torch.equal(again[1], test) and torch.equal(again[0], train)
    assert not torch.equal(em.emoji_split(codes, names, seed=1)[1], test)
    side = {i: "test" for i in test.tolist()} | {i: "train" for i in train.tolist()}
    families: dict[str, set[str]] = {}
    for i, (code, name) in enumerate(zip(codes, names, strict=True)):
        bare = " ".join(c for c in code.split() if int(c, 16) not in em.SKIN_TONES)
        families.setdefault("code " + bare, set()).add(side[i])
        families.setdefault("name " + (name.split(":")[0] if "skin tone" in name else name), set()).add(side[i])
    assert all(len(sides) == 1 for sides in families.values())
    waving = [side[i] for i, n in enumerate(names) if n.startswith("waving hand")]
    assert len(waving) == 6 and len(set(waving)) == 1


@pytest.mark.integration
def test_train_and_test_sets_and_loaders(real_set):
    train, test = em.load_emoji("train"), em.load_emoji("test")
    assert len(train) + len(test) == N_EMOJI and set(train.names).isdisjoint(test.names)
    assert train.group_names == test.group_names == real_set.group_names
    assert set(test.groups) == set(real_set.group_names)  # every group is held out somewhere
    dls = em.emoji_loaders(batch_size=256)
    xb, yb = next(iter(dls.train))
    assert xb.shape == (256, 3, 64, 64) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert float(xb.min()) == -1.0 and float(xb.max()) == 1.0
    assert dls.class_names == real_set.group_names and dls.valid.n == len(test)
    (only_images,) = next(iter(em.emoji_loaders(batch_size=8, label=None).valid))
    assert only_images.shape == (16, 3, 64, 64)
    assert em.emoji_loaders(batch_size=8, label="subgroup").class_names == real_set.subgroup_names
