"""Textual inversion: only the new token's rows move, every vector of a multi-vector token is used, files round trip."""

from __future__ import annotations

import pytest
import torch

from minidiffusion.errors import CheckpointError, ConfigError
from minidiffusion.pipelines.textual_inversion import load_embedding, token_names
from minidiffusion.recipes.textual_inversion import TextualInversionConfig, train_textual_inversion


@pytest.fixture()
def pipe():
    import test_text_to_image as t

    return t.pipe.__wrapped__()


def _images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, 16, 16, dtype=torch.uint8) + 255
    x[:, 0, 4:12, 4:12] = (torch.rand(n, 8, 8, generator=g) * 80 + 170).to(torch.uint8)  # a reddish square
    return x


def test_only_the_new_rows_train_and_every_vector_is_used(pipe, tmp_path):
    before = {n: p.detach().clone() for n, p in pipe.model.net.state_dict().items()}
    vae_before = {n: p.detach().clone() for n, p in pipe.model.vae.state_dict().items()}
    tower_before = {n: p.detach().clone() for n, p in pipe.text_encoder.tower.state_dict().items()}
    vocab = pipe.text_encoder.embedding.num_embeddings
    cfg = TextualInversionConfig(token="<red-sq>", init_word="red", vectors=3, steps=20, lr=5e-2, batch_size=4)
    res = train_textual_inversion(pipe, _images(), tmp_path / "emb.safetensors", cfg, progress=False)
    assert res["tokens"] == ["<red-sq>", "<red-sq-1>", "<red-sq-2>"] and res["steps"] == 20
    assert all(torch.equal(v, pipe.model.net.state_dict()[n]) for n, v in before.items())  # the U-Net: untouched
    assert all(torch.equal(v, pipe.model.vae.state_dict()[n]) for n, v in vae_before.items())
    after = pipe.text_encoder.tower.state_dict()
    for n, v in tower_before.items():
        if n == "tok.weight":
            assert torch.equal(after[n][:vocab], v)  # every old row bit for bit
        else:
            assert torch.equal(after[n], v)
    ids = pipe.text_encoder.tokenizer.add_tokens(res["tokens"])  # already there: their ids
    init = tower_before["tok.weight"][pipe.text_encoder.token_ids("red")].mean(0)
    for i in ids:  # each vector of the three moved away from the init word: each was in the prompts
        assert not torch.allclose(after["tok.weight"][i], init)
    assert pipe.expand("a <red-sq> car") == "a <red-sq> <red-sq-1> <red-sq-2> car"
    assert (tmp_path / "emb.safetensors").stat().st_size < 10_000


def test_an_embedding_loads_into_a_fresh_pipeline_and_is_refused_by_another_encoder(pipe, tmp_path):
    import test_text_to_image as t

    cfg = TextualInversionConfig(token="<red-sq>", init_word="red", vectors=2, steps=5, lr=5e-2)
    train_textual_inversion(pipe, _images(), tmp_path / "emb.safetensors", cfg, progress=False)
    trained = pipe("a <red-sq> emoji", seed=0)
    fresh = t.pipe.__wrapped__()
    assert load_embedding(fresh, tmp_path / "emb.safetensors") == ["<red-sq>", "<red-sq-1>"]
    assert torch.allclose(fresh("a <red-sq> emoji", seed=0), trained, atol=1e-6)
    other = t.pipe.__wrapped__()
    torch.nn.init.normal_(other.text_encoder.embedding.weight)  # another text encoder
    with pytest.raises(CheckpointError, match="learned for another text encoder"):
        load_embedding(other, tmp_path / "emb.safetensors")


def test_refusals():
    assert token_names("<x>", 1) == ["<x>"]
    with pytest.raises(ConfigError, match="vectors must be"):
        TextualInversionConfig(vectors=0)
    with pytest.raises(ConfigError, match="must name the token"):
        TextualInversionConfig(templates=("a photo",))
