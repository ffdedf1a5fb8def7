"""The text-to-image pipeline's contract: seeds per image, strength endpoints, negative prompts, files, the CLI.

The components are tiny and untrained (their zero-initialised layers given random weights, so
that the prompt changes the output): these tests are about what the pipeline does with them.
"""

from __future__ import annotations

import pytest
import torch

from minidiffusion.config import apply_overrides
from minidiffusion.data.tokenizer import train_tokenizer
from minidiffusion.nn.text import TextEncoder, TextEncoderConfig
from minidiffusion.nn.unet import UNet
from minidiffusion.nn.vae import AutoencoderKL, VAEConfig
from minidiffusion.pipelines.image import DiffusionModel, DiffusionModelConfig
from minidiffusion.pipelines.text import ClipTextEncoder, save_text_encoder
from minidiffusion.pipelines.text_to_image import TextToImage, strength_start

CAPTIONS = ["red apple", "green apple", "a smiling face", "a car", "a red car", "flag: japan", "a tree"] * 3


def _wake(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.abs().sum():
            m.weight.data = torch.randn(m.weight.shape, generator=g) * 0.05
    return module


@pytest.fixture(scope="module")
def pipe() -> TextToImage:
    torch.manual_seed(0)
    tok = train_tokenizer(CAPTIONS, vocab_size=300, context=12)
    encoder = ClipTextEncoder(TextEncoder(TextEncoderConfig(vocab_size=tok.vocab_size, context=12, width=16,
                                                            layers=1, heads=2)), tok)
    vae = AutoencoderKL(VAEConfig(channels=(8, 8), norm_groups=4, attention=False, scale_factor=0.7))
    cfg = apply_overrides(DiffusionModelConfig(), ["model.channels=[8, 16]", "model.blocks=[1, 1]",
                                                   "model.attention=[false, true]", "model.norm_groups=4",
                                                   "model.head_dim=8", "model.in_channels=4", "model.context_dim=16",
                                                   "model.pooled_dim=16", "image_size=8", "sigma_data=1.0",
                                                   "steps=4", "guidance=3.0"])
    net = _wake(UNet(cfg.model), 1)
    return TextToImage(DiffusionModel(net, cfg, vae=vae), encoder)


def test_image_k_is_the_same_alone_or_in_a_batch(pipe):
    for sampler in ("dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"):
        batch = pipe("red apple", n=3, seed=5, sampler=sampler)
        assert batch.shape == (3, 3, 16, 16) and batch.min() >= -1 and batch.max() <= 1
        for k in range(3):
            alone = pipe("red apple", n=1, seed=5 + k, sampler=sampler)
            assert torch.allclose(batch[k], alone[0], atol=1e-5), (sampler, k)
        assert not torch.allclose(batch[0], batch[1])


def test_prompts_and_negative_prompts(pipe):
    apple, car = pipe("red apple", seed=0), pipe("a car", seed=0)
    assert not torch.allclose(apple, car)
    # guidance 1 runs only the prompt's branch: the negative prompt changes nothing
    assert torch.equal(pipe("red apple", guidance=1.0, seed=0),
                       pipe("red apple", guidance=1.0, negative_prompt="green", seed=0))
    # the empty prompt is the default unconditional branch
    assert torch.equal(pipe("red apple", seed=0), pipe("red apple", negative_prompt="", seed=0))
    assert not torch.allclose(pipe("red apple", negative_prompt="green", seed=0), apple)


def test_the_guided_denoiser_replaces_the_unconditional_branch_by_the_negative_prompt(pipe):
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0], dtype=torch.float64)
    g = 2.5
    guided = pipe.denoiser("red apple", "green", g)(x, sigma)
    plain = pipe.denoiser("red apple", guidance=1.0)(x, sigma)
    neg = pipe.model.objective.denoiser(pipe.model.net)
    cond = {k: v.expand(2, *v.shape[1:]) for k, v in pipe.conditioning(["green"]).items()}
    uncond = neg(x, sigma, **cond)
    assert torch.allclose(guided, uncond + g * (plain - uncond), atol=1e-5)


def test_strength_endpoints_and_the_step_it_starts_at(pipe):
    assert [strength_start(20, s) for s in (0.0, 0.3, 0.6, 1.0)] == [20, 14, 8, 0]
    init = torch.rand(1, 3, 16, 16) * 2 - 1
    none = pipe("red apple", init_image=init, strength=0.0, n=2)
    with torch.no_grad():
        through_vae = pipe.model.to_images(pipe.encode_image(init))
    assert torch.equal(none[0], through_vae[0].cpu()) and torch.equal(none[0], none[1])  # strength 0: the image back
    full, text_only = pipe("red apple", init_image=init, strength=1.0, seed=3), pipe("red apple", seed=3)
    other_seed = pipe("red apple", seed=4)
    assert (full - text_only).abs().mean() < 0.5 * (other_seed - text_only).abs().mean()  # strength 1: image gone
    half = pipe("red apple", init_image=init, strength=0.5, seed=3)
    assert (half - through_vae).abs().mean() < (text_only - through_vae).abs().mean()  # it keeps some of the image
    with pytest.raises(ValueError, match="strength must be"):
        pipe("red apple", init_image=init, strength=1.5)


def test_files_json_and_the_command_line(pipe, tmp_path):
    from minidiffusion.artifacts import save_component
    from minidiffusion.cli import main
    from minidiffusion.paths import float32_state
    from minidiffusion.pipelines.image import save_model

    run = tmp_path / "t2i"
    save_model(pipe.model.net, pipe.cfg, None, run / "model.safetensors")
    save_component(run / "vae.safetensors", float32_state(pipe.model.vae), pipe.model.vae.cfg, "vae")
    save_text_encoder(pipe.text_encoder, run)
    loaded = TextToImage.from_run(run)
    assert torch.equal(loaded("a tree", seed=1), pipe("a tree", seed=1))
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "init.png")
    out = tmp_path / "out.png"
    assert main(["sample", str(run), "--prompt", "a tree", "--n", "2", "--init-image", str(tmp_path / "init.png"),
                 "--strength", "0.5", "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "out-progression.png").is_file()
    import numpy as np

    images = np.load(tmp_path / "out.npz")["images"]
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert main(["sample", str(run), "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2  # no prompt
    assert main(["sample", str(run), "--prompt", "a tree", "--schedule", "karras",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_a_pipeline_folder_stored_in_float16_loads_and_draws_nearly_the_same(pipe, tmp_path):
    import shutil

    from minidiffusion.artifacts import half_precision_copy, read_safetensors, save_component
    from minidiffusion.paths import float32_state
    from minidiffusion.pipelines.image import save_model

    run, half = tmp_path / "t2i", tmp_path / "half"
    save_model(pipe.model.net, pipe.cfg, None, run / "model.safetensors")
    save_component(run / "vae.safetensors", float32_state(pipe.model.vae), pipe.model.vae.cfg, "vae")
    save_text_encoder(pipe.text_encoder, run)
    half.mkdir()
    for f in run.glob("*.safetensors"):
        half_precision_copy(f, half / f.name)
        tensors, meta = read_safetensors(half / f.name)
        assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float16}
        assert meta["kind"] == read_safetensors(f)[1]["kind"]
        assert (half / f.name).stat().st_size < 0.6 * f.stat().st_size
    for f in run.iterdir():
        if f.suffix not in (".safetensors", ".toml"):
            shutil.copy(f, half / f.name)
    loaded = TextToImage.from_run(half)
    assert next(loaded.model.net.parameters()).dtype == torch.float32  # cast back on load
    a, b = loaded("a tree", seed=1), pipe("a tree", seed=1)
    diff = (a - b).abs()
    assert 0 < diff.mean() < 1e-2 and diff.max() < 0.1, (diff.mean(), diff.max())  # float16-rounded weights


def test_the_shipped_emoji_pipeline_answers_prompts_by_colour():
    shipped = TextToImage.from_pretrained("emoji")
    assert next(shipped.model.net.parameters()).dtype == torch.float32  # stored in float16, run in float32
    kw = dict(n=4, seed=0, steps=10, guidance=4.0)
    red, blue = shipped("an emoji of red heart", **kw), shipped("an emoji of blue heart", **kw)
    assert red.shape == (4, 3, 64, 64) and red.min() >= -1 and red.max() <= 1

    def redness(x):  # mean of R - B over the pixels that are not the white background
        ink = x.min(1).values < 0.8
        return float((x[:, 0] - x[:, 2])[ink].mean())

    assert redness(red) > 0.3 and redness(blue) < -0.1, (redness(red), redness(blue))
    alone = shipped("an emoji of red heart", n=1, seed=1, steps=10, guidance=4.0)[0]
    assert torch.allclose(red[1], alone, atol=1e-4)  # image k = seed + k, alone or in a batch
