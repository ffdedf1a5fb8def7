"""Captions for the emoji: each image's Unicode name with its group and subgroup words, in varied templates.

An emoji's caption is built from three parts (`caption_parts`): its name as Unicode writes it
("red apple", "waving hand: medium skin tone"), its group in words ("Food & Drink" -> "food and
drink") and its subgroup in words ("food-fruit" -> "food, fruit"). A template (`TEMPLATES`) puts
them into a phrase, "an emoji of red apple" or "red apple, food, fruit". Each epoch every item gets
a template drawn at random (`captions_for`, seeded by the seed *and* the epoch, so a run is
reproducible while an image is seen under several phrasings), so a text-to-image model learns
phrases, not one fixed string per image, and the prompt "an emoji of ..." works at sampling time.

Captions are built from one split at a time: a model trained on `captions_for(load_emoji("train"),
...)` never sees the name of a held-out emoji, so prompts for the test split measure generalisation.
`all_captions` gives every template of every item once: the corpus a tokenizer is trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from ..config import check_number
from ..errors import ConfigError

__all__ = ["TEMPLATES", "CaptionParts", "caption_parts", "caption", "captions_for", "all_captions"]

TEMPLATES: tuple[str, ...] = (
    "{name}",
    "an emoji of {name}",
    "{name}, {subgroup}",
    "a {group} emoji: {name}",
    "{name} emoji",
    "an emoji of {name}, {subgroup}",
)  # fields: {name}, {group}, {subgroup}; the first is the bare name, the prompt closest to the label


class CaptionParts(NamedTuple):
    """The words of one emoji's caption: name ("red apple"), group ("food and drink"), subgroup ("food, fruit")."""

    name: str
    group: str
    subgroup: str


class _Captioned(Protocol):
    """What captions need of a set: per-item names, groups and subgroups (an `EmojiSet` has them)."""

    names: list[str]
    groups: list[str]
    subgroups: list[str]


def _words(text: str) -> str:
    """Lower case, "&" spelled "and", runs of white space made one space."""
    return " ".join(text.replace("&", " and ").lower().split())


def caption_parts(name: str, group: str, subgroup: str) -> CaptionParts:
    """Return the CaptionParts of one emoji from its emoji-test.txt fields, e.g. ("red apple", "Food & Drink",
    "food-fruit") -> ("red apple", "food and drink", "food, fruit"); words are lower case, the name as given."""
    group_words = _words(group)
    subgroup_words = ", ".join(w for w in (_words(p) for p in subgroup.split("-")) if w)
    return CaptionParts(" ".join(name.split()), group_words, subgroup_words)


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    templates = tuple(templates)
    if not templates:
        raise ConfigError("templates is empty; give at least one caption template, e.g. '{name}'")
    for t in templates:
        try:
            t.format(name="", group="", subgroup="")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ConfigError(f"caption template {t!r} is not valid ({e!r}); use only the fields {{name}}, "
                              "{group} and {subgroup}") from None
        if "{name}" not in t:
            raise ConfigError(f"caption template {t!r} has no {{name}}; every caption must name its emoji")
    return templates


def caption(parts: CaptionParts, template: str = TEMPLATES[0]) -> str:
    """Return one caption: `template` filled with `parts` (a str, e.g. "an emoji of red apple")."""
    return template.format(name=parts.name, group=parts.group, subgroup=parts.subgroup)


def _parts_of(items: _Captioned) -> list[CaptionParts]:
    names, groups, subgroups = list(items.names), list(items.groups), list(items.subgroups)
    if not len(names) == len(groups) == len(subgroups):
        raise ConfigError(f"the set has {len(names)} names but {len(groups)} groups and {len(subgroups)} "
                          "subgroups; give an EmojiSet (load_emoji) or lists of equal length")
    return [caption_parts(*fields) for fields in zip(names, groups, subgroups, strict=True)]


def captions_for(items: _Captioned, epoch: int = 0, seed: int = 0,
                 templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Return one caption per item (a list of N str, in the set's order), each from a template drawn at random.

    The draw depends only on (`seed`, `epoch`) and the number of items: the same arguments always give
    the same captions, another epoch gives another mix. `items` is an EmojiSet (or anything with
    `names`, `groups`, `subgroups`); pass a split (`load_emoji("train")`) to keep held-out emoji out.
    """
    check_number("epoch", epoch, lo=0, integer=True)
    check_number("seed", seed, lo=0, integer=True)
    templates = _check_templates(templates)
    parts = _parts_of(items)
    choice = np.random.default_rng([seed, epoch]).integers(len(templates), size=len(parts))
    return [caption(p, templates[int(i)]) for p, i in zip(parts, choice, strict=True)]


def all_captions(items: _Captioned, templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Return every template of every item (a list of N * len(templates) str, item-major): the tokenizer's corpus."""
    templates = _check_templates(templates)
    return [caption(p, t) for p in _parts_of(items) for t in templates]
