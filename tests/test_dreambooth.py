"""DreamBooth: the prior-preservation loss on a hand case, and a fine-tuned pipeline folder that loads."""

from __future__ import annotations

import pytest
import torch

from minidiffusion.diffusion.objectives import EDMObjective
from minidiffusion.errors import ConfigError
from minidiffusion.recipes.dreambooth import DreamBoothConfig, dreambooth_loss, train_dreambooth


def test_the_loss_is_the_subject_loss_plus_the_weighted_prior_loss():
    obj = EDMObjective(sigma_data=1.0)
    net = lambda x, level, label: 0.3 * x + label.reshape(-1, 1, 1, 1)  # noqa: E731
    subject, prior = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sc, pc = {"label": torch.ones(3)}, {"label": torch.zeros(3)}
    torch.manual_seed(7)
    ls = obj.loss(net, subject, **sc)
    lp = obj.loss(net, prior, **pc)
    torch.manual_seed(7)
    total, parts = dreambooth_loss(obj, net, subject, sc, prior, pc, prior_weight=0.5)
    assert torch.allclose(total, ls + 0.5 * lp) and torch.allclose(parts["prior"], lp)
    torch.manual_seed(7)
    alone, parts = dreambooth_loss(obj, net, subject, sc, prior, pc, prior_weight=0.0)
    assert torch.allclose(alone, ls) and "prior" not in parts


def test_dreambooth_writes_a_pipeline_with_a_fine_tuned_unet(tmp_path):
    import test_text_to_image as t
    from minidiffusion.artifacts import save_component
    from minidiffusion.paths import float32_state
    from minidiffusion.pipelines.image import save_model
    from minidiffusion.pipelines.text import save_text_encoder
    from minidiffusion.pipelines.text_to_image import TextToImage

    pipe = t.pipe.__wrapped__()
    run = tmp_path / "run"
    save_model(pipe.model.net, pipe.cfg, None, run / "model.safetensors")
    save_component(run / "vae.safetensors", float32_state(pipe.model.vae), pipe.model.vae.cfg, "vae")
    save_text_encoder(pipe.text_encoder, run)
    before = {k: v.clone() for k, v in pipe.model.net.state_dict().items()}
    images = torch.randint(0, 255, (3, 3, 16, 16), dtype=torch.uint8)
    cfg = DreamBoothConfig(token="sks", class_word="car", steps=6, class_images=5, class_steps=2, lr=1e-3)
    res = train_dreambooth(pipe, run, images, tmp_path / "db", cfg, progress=False)
    assert res["class_images"] == 5 and res["steps"] == 6
    for name in ("vae.safetensors", "vae.toml", "text_encoder.safetensors", "tokenizer.json"):
        assert (tmp_path / "db" / name).read_bytes() == (run / name).read_bytes()
    tuned = TextToImage.from_run(tmp_path / "db")
    assert any(not torch.equal(before[k], v) for k, v in tuned.model.net.state_dict().items())
    assert tuned("a sks car", seed=0).shape == (1, 3, 16, 16)
    with pytest.raises(ConfigError, match="already holds files"):
        train_dreambooth(pipe, run, images, tmp_path / "db", cfg, progress=False)


def test_refusals():
    with pytest.raises(ConfigError, match="give a token"):
        DreamBoothConfig(class_word=" ")
    with pytest.raises(ConfigError, match="prior_weight must be"):
        DreamBoothConfig(prior_weight=-1)
    assert DreamBoothConfig(token="sks", class_word="dog").subject_prompt == "a sks dog"
