"""The byte-level BPE tokenizer: round trip, fixed length, the empty prompt, determinism, save/load, any text,
added tokens. The real-caption test FAILS (never skips) when Debian's unicode-data is missing."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

from minidiffusion.data import emoji as em
from minidiffusion.data.captions import all_captions
from minidiffusion.data.tokenizer import END, PAD, START, Tokenizer, TokenizerConfig, train_tokenizer
from minidiffusion.errors import CheckpointError, ConfigError, DataError

CORPUS = ["red apple", "an emoji of red apple", "green apple, food, fruit", "a food and drink emoji: shortcake",
          "waving hand: medium skin tone", "an emoji of waving hand", "flag: Japan", "woman technologist",
          "grinning face with big eyes", "a smileys and emotion emoji: grinning face"] * 5
CONTEXT = 24


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=400, context=CONTEXT)


def test_special_tokens_and_vocabulary(tok):
    assert [tok.pad_id, tok.start_id, tok.end_id] == [0, 1, 2]
    assert [tok.inner.id_to_token(i) for i in range(3)] == [PAD, START, END]
    assert 259 < tok.vocab_size <= 400 and tok.context == CONTEXT
    assert tok.tokens("red apple") == [START, "Ġred", "Ġapple", END]  # whole words of the corpus are one token


def test_round_trip(tok):
    texts = ["red apple", "an emoji of waving hand: medium skin tone", "a tomato it never saw"]
    ids, mask = tok.encode(texts)
    assert tok.decode(ids) == texts
    assert tok.decode(ids[1]) == [texts[1]] and tok.decode(ids[0].tolist()) == [texts[0]]
    # text is normalised: lower case, single spaces, no outer spaces
    assert tok.decode(tok.encode("  Red   APPLE ")[0]) == ["red apple"]


def test_padding_and_truncation_to_the_context(tok):
    long = " ".join(["an emoji of red apple"] * 20)
    ids, mask = tok.encode(["red apple", long])
    assert ids.shape == mask.shape == (2, CONTEXT) and ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids[0, :4].tolist() == [tok.start_id, *ids[0, 1:3].tolist(), tok.end_id]
    assert mask[0].tolist() == [True] * 4 + [False] * (CONTEXT - 4)
    assert (ids[0, 4:] == tok.pad_id).all()
    assert mask[1].all() and ids[1, 0] == tok.start_id and ids[1, -1] == tok.end_id  # cut, <end> kept last
    assert tok.decode(ids[1:])[0] == long[: len(tok.decode(ids[1:])[0])]
    assert tok.encode([])[0].shape == (0, CONTEXT)


def test_empty_prompt_is_start_end_then_padding(tok):
    ids, mask = tok.encode("")
    assert ids.tolist() == [[tok.start_id, tok.end_id] + [tok.pad_id] * (CONTEXT - 2)]
    assert mask.tolist() == [[True, True] + [False] * (CONTEXT - 2)]
    assert tok.decode(ids) == [""]
    assert torch.equal(tok.encode("   ")[0], ids)


def test_training_is_deterministic(tok):
    again = train_tokenizer(CORPUS, vocab_size=400, context=CONTEXT)
    assert again == tok and again.to_str() == tok.to_str()
    # and in a fresh process (the library's hash maps are seeded per process)
    code = ("import hashlib, sys; from minidiffusion.data.tokenizer import train_tokenizer; "
            f"t = train_tokenizer({CORPUS!r}, vocab_size=400, context={CONTEXT}); "
            "sys.stdout.write(hashlib.sha256(t.to_str().encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == hashlib.sha256(tok.to_str().encode()).hexdigest()
    assert train_tokenizer(CORPUS[:7], vocab_size=400, context=CONTEXT) != tok


def test_save_and_load_give_the_same_tokenizer(tok, tmp_path):
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    back = Tokenizer.from_file(path)
    assert back == tok and back.context == CONTEXT and back.vocab_size == tok.vocab_size
    texts = ["red apple", "", "café 🍎 and a tomato"]
    for a, b in zip(tok.encode(texts), back.encode(texts), strict=True):
        assert torch.equal(a, b)
    assert Tokenizer.from_file(path, context=8).encode("red apple")[0].shape == (1, 8)
    assert not list(tmp_path.glob("sub/.*"))  # no temporary file left


@pytest.mark.parametrize("text", ["café crème brûlée", "🍎🍐 piñata", "日本の旗", "naïve\tzoë\n", "\x00\x7f", "👩‍💻"])
def test_any_text_encodes_and_decodes_at_byte_level(tok, text):
    ids, mask = tok.encode(text)
    assert mask.sum() > 2
    normalised = " ".join(text.lower().split())
    assert tok.decode(ids) == [normalised]  # nothing is lost: every byte has a token


def test_added_tokens_get_new_ids_and_encode_as_one_token(tmp_path):
    tok = train_tokenizer(CORPUS, vocab_size=400, context=CONTEXT)
    n = tok.vocab_size
    assert tok.add_tokens(["<my-cat>", "<MyDog>"]) == [n, n + 1] and tok.vocab_size == n + 2
    assert tok.add_tokens(["<my-cat>"]) == [n]  # adding again keeps the id
    with_new = tok.tokens("an emoji of <my-cat> flag")
    assert [t.strip() for t in with_new] == [START, "Ġan", "Ġemoji", "Ġof", "<my-cat>", "Ġflag", END]
    ids, _ = tok.encode(["an emoji of <my-cat> flag", "<MyDog>"])
    assert (ids[0] == n).sum() == 1 and ids[1, :3].tolist() == [tok.start_id, n + 1, tok.end_id]
    assert tok.decode(ids)[1] == "<MyDog>"  # matched before normalisation, decoded as written
    back = Tokenizer.from_file(tok.save(tmp_path / "t.json"))
    assert back.encode("a <my-cat>")[0].tolist() == tok.encode("a <my-cat>")[0].tolist()
    for word in ("apple", "a", "<end>"):  # a whole word or a special token of the vocabulary
        with pytest.raises(ConfigError, match="already a token"):
            tok.add_tokens([word])
    with pytest.raises(ConfigError, match="one word without spaces"):
        tok.add_tokens(["my cat"])


def test_bad_input_is_one_sentence(tok, tmp_path):
    with pytest.raises(ConfigError, match="vocab_size must be an integer"):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(ConfigError, match="context must be"):
        train_tokenizer(CORPUS, context=1)
    with pytest.raises(ConfigError, match="no texts"):
        train_tokenizer([])
    with pytest.raises(ConfigError, match="prompts must be strings"):
        tok.encode(["red apple", 3])
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a tokenizer file"):
        Tokenizer.from_file(tmp_path / "junk.json")
    with pytest.raises(CheckpointError, match="no special token '<s>'"):
        Tokenizer.from_str(tok.to_str(), start="<s>")


def test_real_training_captions_fit_the_context():
    try:
        found = em.parse_emoji_test()
    except DataError as e:
        pytest.fail(f"tokenizer tests need Unicode's emoji-test.txt (`apt-get install unicode-data`): {e}",
                    pytrace=False)
    full = em.EmojiSet(torch.zeros(len(found), 3, 1, 1, dtype=torch.uint8), [e.code for e in found],
                       [e.name for e in found], [e.group for e in found], [e.subgroup for e in found], [], [])
    train, test = full.split()
    tok = train_tokenizer(all_captions(train))  # the defaults: 2048 tokens, context 32
    assert tok.vocab_size == 2048 and tok.context == 32
    for split in (train, test):
        caps = all_captions(split)
        ids, mask = tok.encode(caps)
        assert (~mask[:, -1]).all(), "a caption was cut: raise the default context"
        assert tok.decode(ids[:50]) == [c.lower() for c in caps[:50]]
    assert tok.tokens("an emoji of a cat face") == [START, "Ġan", "Ġemoji", "Ġof", "Ġa", "Ġcat", "Ġface", END]
    assert "red apple" in test.names and tok.decode(tok.encode("red apple")[0]) == ["red apple"]  # held out
