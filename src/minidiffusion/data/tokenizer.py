"""A byte-level BPE tokenizer trained on our own captions: text -> fixed-length token ids and a padding mask.

Byte-level BPE (GPT-2, Radford et al. 2019; CLIP uses the same scheme) starts from the 256 byte
values and merges the most frequent adjacent pairs into new tokens until the vocabulary is full.
Every string is a sequence of bytes, so no input can fail or turn into an "unknown" token: an
accent or an emoji the captions never showed becomes a few byte tokens.

We train it here, on the training captions (`train_tokenizer`, with the `tokenizers` library),
rather than use CLIP's own 49,408-token vocabulary. Its merges file is not on this machine or in
any Debian or PyPI package we depend on, and we run offline; vendoring it would be possible (the
CLIP repository is MIT-licensed, so it would need its licence notice kept), but almost all of its
tokens are for words no emoji caption contains, so a text encoder's embedding table would be
mostly dead weight. A couple of thousand tokens fit the captions, and the tokenizer is saved beside
the model as one JSON file (`Tokenizer.save`, `Tokenizer.from_file`), so the model always reads
text the way it was trained to.

Every encoding is `<start> tokens <end> <pad> ...`, exactly `context` long (longer texts are cut,
keeping `<end>` last), with a mask that is True from `<start>` to `<end>`. The empty prompt "" is
`<start> <end> <pad> ...`: the unconditional prompt of classifier-free guidance. Text is normalised
first (Unicode NFC, lower case, runs of white space made one space), so `decode` returns it in that
form. `add_tokens(["<my-cat>"])` adds a word as one new token (textual inversion learns its embedding).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import check_number
from ..errors import CheckpointError, ConfigError
from ..paths import atomic_write

__all__ = ["PAD", "START", "END", "TokenizerConfig", "Tokenizer", "train_tokenizer", "import_tokenizers"]

PAD, START, END = "<pad>", "<start>", "<end>"  # ids 0, 1, 2 of a tokenizer trained here
_INSTALL = "install the text extra: pip install -e '.[text]' (the `tokenizers` package)"


def import_tokenizers() -> Any:
    """Return the `tokenizers` module, or raise ConfigError saying how to install it."""
    try:
        import tokenizers
    except ImportError as e:
        raise ConfigError(f"text prompts need the tokenizers package ({e}); {_INSTALL}") from None
    return tokenizers


@dataclass
class TokenizerConfig:
    """How `train_tokenizer` builds a tokenizer: vocabulary size (bytes, specials and merges), context length,
    and how often a pair must occur to be merged."""

    vocab_size: int = 2048
    context: int = 32  # tokens per encoding, <start> and <end> included
    min_frequency: int = 2

    def __post_init__(self):
        check_number("vocab_size", self.vocab_size, lo=259, hi=1_000_000, integer=True)  # 256 bytes + 3 specials
        check_number("context", self.context, lo=2, hi=4096, integer=True)
        check_number("min_frequency", self.min_frequency, lo=1, hi=1_000_000, integer=True)


class Tokenizer:
    """Fixed-length encoding with start, end and pad tokens around a `tokenizers.Tokenizer` (`self.inner`).

    Build one with `train_tokenizer` or `Tokenizer.from_file`; `start`, `end` and `pad` name the special
    tokens (another vocabulary, e.g. BERT's "[CLS]", "[SEP]", "[PAD]", works the same way).
    """

    def __init__(self, inner: Any, context: int | None = None, start: str = START, end: str = END, pad: str = PAD):
        self.inner = inner
        self.start, self.end, self.pad = start, end, pad
        ids = [inner.token_to_id(t) for t in (start, end, pad)]
        if None in ids:
            missing = [t for t, i in zip((start, end, pad), ids, strict=True) if i is None]
            raise CheckpointError(f"this tokenizer has no special token {missing[0]!r}; give the tokenizer.json "
                                  "saved with the model (Tokenizer.save) or name its start/end/pad tokens")
        self.start_id, self.end_id, self.pad_id = ids
        if context is None:
            context = (inner.padding or {}).get("length")
            if context is None:
                raise ConfigError("this tokenizer file fixes no context length; pass context=, e.g. 32")
        check_number("context", context, lo=2, hi=4096, integer=True)
        self.context = int(context)
        tokenizers = import_tokenizers()
        inner.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{start} $A {end}", special_tokens=[(start, self.start_id), (end, self.end_id)])
        inner.enable_truncation(max_length=self.context)  # leaves room for <start> and <end>
        inner.enable_padding(pad_id=self.pad_id, pad_token=pad, length=self.context)

    @classmethod
    def from_str(cls, text: str, context: int | None = None, **special: str) -> Tokenizer:
        """Return the tokenizer serialised in `text` (the JSON of `to_str`)."""
        tokenizers = import_tokenizers()
        try:
            inner = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
            raise CheckpointError(f"not a tokenizer file ({str(e)[:120]}); give the tokenizer.json saved with "
                                  "the model (Tokenizer.save)") from None
        return cls(inner, context, **special)

    @classmethod
    def from_file(cls, path: str | Path, context: int | None = None, **special: str) -> Tokenizer:
        """Return the tokenizer saved at `path` (a tokenizer.json), identical to the one saved; `context`
        overrides the file's context length."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CheckpointError(f"tokenizer file {path} does not exist; give the tokenizer.json saved with "
                                  "the model") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read the tokenizer file {path} ({e}); give the tokenizer.json saved "
                                  "with the model") from None
        return cls.from_str(text, context, **special)

    def to_str(self) -> str:
        """Return the whole tokenizer (vocabulary, merges, added tokens, context length) as JSON text."""
        return self.inner.to_str()

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer to `path` as JSON (atomically); return the path."""
        path = Path(path)
        with atomic_write(path) as tmp:
            tmp.write_text(self.to_str(), encoding="utf-8")
        return path

    @property
    def vocab_size(self) -> int:
        """Number of token ids (an int): the embedding table a text encoder needs, added tokens included."""
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (ids int64 [B, context], mask bool [B, context]); the mask is True from <start> to <end>.

        A single str is a batch of one. Longer texts are cut to `context` tokens, <end> kept last.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            bad = next(t for t in texts if not isinstance(t, str))
            raise ConfigError(f"prompts must be strings, got {type(bad).__name__} {bad!r}")
        encs = self.inner.encode_batch(texts) if texts else []
        ids = torch.tensor([e.ids for e in encs], dtype=torch.int64).reshape(len(texts), self.context)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.bool).reshape(len(texts), self.context)
        return ids, mask

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]] | Sequence[int]) -> list[str]:
        """Return the text of each row of `ids` (int [B, T], or one row [T]) as a list of B str, special tokens
        dropped and stopping at <end>; text comes back normalised (lower case, single spaces)."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if rows and isinstance(rows[0], int):  # one row
            rows = [rows]
        out = []
        for row in rows:
            row = row[: row.index(self.end_id)] if self.end_id in row else row
            out.append(self.inner.decode(row, skip_special_tokens=True).strip())
        return out

    def tokens(self, text: str) -> list[str]:
        """Return the token strings of one encoded text, <start> to <end> (a list of at most `context` str)."""
        enc = self.inner.encode(text)
        return [t for t, m in zip(enc.tokens, enc.attention_mask, strict=True) if m]

    def add_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Return the ids of `tokens` (a list of int), adding each as one new token matched exactly in prompts.

        A token added before keeps its id; a special token, or a word the vocabulary already holds as one token,
        is refused. An added token is matched anywhere in a prompt, even inside a word, so give it a name that
        no ordinary prompt contains ("<my-cat>", not "cat").
        """
        tokenizers = import_tokenizers()
        added = {t.content for t in self.inner.get_added_tokens_decoder().values() if not t.special}
        for t in tokens:
            if not isinstance(t, str) or not t.strip() or t != t.strip() or len(t.split()) > 1:
                raise ConfigError(f"cannot add token {t!r}: give one word without spaces, e.g. '<my-cat>'")
            if t not in added and (t in (self.start, self.end, self.pad) or len(self.tokens(t)) <= 3):
                raise ConfigError(f"cannot add token {t!r}: it is already a token of the vocabulary; choose a name "
                                  "no prompt uses otherwise, e.g. '<my-cat>'")
        new = [tokenizers.AddedToken(t, lstrip=True, normalized=False) for t in dict.fromkeys(tokens) if t not in added]
        self.inner.add_tokens(new)
        return [self.inner.token_to_id(t) for t in tokens]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_str() == other.to_str()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, context={self.context})"


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig | None = None, **kwargs) -> Tokenizer:
    """Return a byte-level BPE Tokenizer trained on `texts` (e.g. `all_captions(load_emoji("train"))`).

    Ids 0, 1, 2 are <pad>, <start>, <end>, then the 256 byte tokens, then merges, up to `cfg.vocab_size`
    (fewer when the texts run out of pairs seen `min_frequency` times). The same texts and config always
    give the same tokenizer.
    """
    cfg = cfg or TokenizerConfig(**kwargs)
    tk = import_tokenizers()
    texts = list(texts)
    if not texts:
        raise ConfigError("no texts to train the tokenizer on; give the training captions (all_captions)")
    inner = tk.Tokenizer(tk.models.BPE())
    inner.normalizer = tk.normalizers.Sequence([
        tk.normalizers.NFC(), tk.normalizers.Lowercase(),
        tk.normalizers.Replace(tk.Regex(r"\s+"), " "), tk.normalizers.Strip()])
    inner.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
    inner.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                     special_tokens=[PAD, START, END], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    inner.train_from_iterator(texts, trainer)
    return Tokenizer(inner, cfg.context)
