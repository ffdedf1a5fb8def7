"""Emoji captions: the parts of a caption, the templates, the seeded per-epoch draw, captions per split.

Tests on the real emoji list FAIL (never skip) when Debian's unicode-data is missing. They use the list's
names and labels only (no rendering), split the way load_emoji splits its rendered set.
"""

from __future__ import annotations

import pytest
import torch

from minidiffusion.data import emoji as em
from minidiffusion.data.captions import TEMPLATES, CaptionParts, all_captions, caption, caption_parts, captions_for
from minidiffusion.errors import ConfigError, DataError


def _need(what: str, package: str, call):
    """Return call(); FAIL the test with a sentence naming the Debian package when it raises DataError."""
    try:
        return call()
    except DataError as e:
        problem = str(e)
    pytest.fail(f"caption tests need {what} (`apt-get install {package}`): {problem}", pytrace=False)


@pytest.fixture(scope="module")
def real_list() -> em.EmojiSet:
    """Every fully-qualified emoji of Debian's emoji-test.txt as an EmojiSet without pixels (1x1 blank images)."""
    found = _need("Unicode's emoji-test.txt", "unicode-data", em.parse_emoji_test)
    return em.EmojiSet(torch.zeros(len(found), 3, 1, 1, dtype=torch.uint8), [e.code for e in found],
                       [e.name for e in found], [e.group for e in found], [e.subgroup for e in found],
                       list(dict.fromkeys(e.group for e in found)), list(dict.fromkeys(e.subgroup for e in found)))


def _set(names, groups, subgroups) -> em.EmojiSet:
    return em.EmojiSet(torch.zeros(len(names), 3, 1, 1, dtype=torch.uint8), [""] * len(names), names, groups,
                       subgroups, sorted(set(groups)), sorted(set(subgroups)))


SMALL = _set(["red apple", "green apple", "shortcake", "waving hand: medium skin tone", "flag: Japan"] * 4,
             ["Food & Drink"] * 12 + ["People & Body", "Flags"] * 4,
             ["food-fruit", "food-fruit", "food-sweet"] * 4 + ["hand-fingers-open", "country-flag"] * 4)


def test_caption_parts_spell_groups_and_subgroups_as_words():
    assert caption_parts("red apple", "Food & Drink", "food-fruit") == ("red apple", "food and drink", "food, fruit")
    assert caption_parts("waving hand: medium skin tone", "People & Body", "hand-fingers-open") == \
        CaptionParts("waving hand: medium skin tone", "people and body", "hand, fingers, open")
    assert caption_parts("flag:  Japan", "Flags", "country-flag") == ("flag: Japan", "flags", "country, flag")
    assert caption_parts("x", "Objects", "light & video").subgroup == "light and video"


def test_templates_fill_every_field():
    parts = caption_parts("red apple", "Food & Drink", "food-fruit")
    filled = [caption(parts, t) for t in TEMPLATES]
    assert filled[:4] == ["red apple", "an emoji of red apple", "red apple, food, fruit",
                          "a food and drink emoji: red apple"]
    assert len(set(filled)) == len(TEMPLATES) and all("red apple" in c for c in filled)
    assert caption(parts) == "red apple"


def test_captions_are_seeded_by_seed_and_epoch():
    a = captions_for(SMALL, epoch=0, seed=0)
    assert len(a) == len(SMALL) and a == captions_for(SMALL, epoch=0, seed=0)
    assert all(name in c for name, c in zip(SMALL.names, a, strict=True))
    assert captions_for(SMALL, epoch=1, seed=0) != a and captions_for(SMALL, epoch=0, seed=1) != a
    # over a few epochs one image is seen under several templates
    seen = {captions_for(SMALL, epoch=e, seed=0)[0] for e in range(10)}
    assert len(seen) >= 3


def test_all_captions_is_every_template_of_every_item():
    out = all_captions(SMALL)
    assert len(out) == len(SMALL) * len(TEMPLATES)
    assert out[: len(TEMPLATES)] == [caption(caption_parts("red apple", "Food & Drink", "food-fruit"), t)
                                     for t in TEMPLATES]
    assert all_captions(SMALL, templates=["{name}!"])[:2] == ["red apple!", "green apple!"]


@pytest.mark.parametrize("templates, match", [
    ([], "at least one"), (["{colour} {name}"], "only the fields"), (["an emoji"], "no {name}"),
    (["{name"], "not valid"),
])
def test_bad_templates_are_one_sentence(templates, match):
    with pytest.raises(ConfigError, match=match):
        captions_for(SMALL, templates=templates)


def test_bad_epoch_seed_or_lists():
    with pytest.raises(ConfigError, match="epoch must be an integer"):
        captions_for(SMALL, epoch=-1)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        captions_for(SMALL, seed=1.5)
    broken = _set(["a", "b"], ["G", "G"], ["s", "s"])
    broken.groups = ["G"]
    with pytest.raises(ConfigError, match="2 names but 1 groups"):
        captions_for(broken)


def test_real_captions_are_built_per_split(real_list):
    train, test = real_list.split()  # the family split load_emoji uses
    assert not set(train.names) & set(test.names)
    caps = captions_for(train, epoch=3, seed=7)
    assert len(caps) == len(train) and all(n in c for n, c in zip(train.names, caps, strict=True))
    # every template is used, roughly evenly
    per_template = [sum(c == caption(caption_parts(*f), t) for c, f in
                        zip(caps, zip(train.names, train.groups, train.subgroups, strict=True), strict=True))
                    for t in TEMPLATES]
    assert sum(per_template) == len(train) and min(per_template) > 0.8 * len(train) / len(TEMPLATES)
    corpus = all_captions(train)
    assert len(corpus) == len(train) * len(TEMPLATES)
    assert "an emoji of red apple" in corpus or "an emoji of red apple" in all_captions(test)
