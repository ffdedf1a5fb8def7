"""A real (tiny, random) Stable Diffusion folder through our pipeline equals diffusers' own pipelines.

The test builds every component from small configs (a UNet2DConditionModel, an AutoencoderKL, a
CLIPTextModel, a CLIPTokenizer from a vocabulary it writes, a DDIMScheduler with Stable Diffusion's
settings) and saves them with `save_pretrained`, as a user's folder would be. With DDIM and the same
seed, our samplers, guidance, negative prompt and image-to-image give diffusers' numbers to 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from minidiffusion.errors import CheckpointError  # noqa: E402
from minidiffusion.pipelines.sd import StableDiffusion  # noqa: E402


def _tokenizer(folder):
    try:
        from transformers.models.clip.tokenization_clip import bytes_to_unicode
    except ImportError:  # older or newer layouts
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """(folder, the diffusers pipeline) of a tiny random Stable Diffusion saved with save_pretrained."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  sample_size=16)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513))
    tokenizer = _tokenizer(root / "tok")
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "sd")
    return root / "sd", pipe


@pytest.mark.parametrize("negative", [None, "blue"])
def test_text_to_image_equals_diffusers(sd_folder, negative):
    folder, ref = sd_folder
    ours = StableDiffusion.from_pretrained(folder)
    with torch.no_grad():
        expected = ref("a red apple", negative_prompt=negative, num_inference_steps=5, guidance_scale=7.5,
                       generator=torch.Generator().manual_seed(0), output_type="pt").images
    got = ours("a red apple", negative_prompt=negative, sampler="ddim", steps=5, guidance=7.5, seed=0,
               precision="fp32")
    assert got.shape == expected.shape == (1, 3, 16, 16)
    assert torch.allclose((got + 1) / 2, expected, atol=1e-4), float(((got + 1) / 2 - expected).abs().max())


def test_image_to_image_equals_diffusers(sd_folder):
    folder, ref = sd_folder
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    init = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        expected = img2img("a red apple", image=(init + 1) / 2, strength=0.6, num_inference_steps=5,
                           guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    ours = StableDiffusion.from_pretrained(folder)
    got = ours("a red apple", init_image=init, strength=0.6, sampler="ddim", steps=5, guidance=7.5, seed=0,
               precision="fp32")
    assert torch.allclose((got + 1) / 2, expected, atol=1e-4), float(((got + 1) / 2 - expected).abs().max())


def test_every_sampler_runs_on_stable_diffusion(sd_folder):
    ours = StableDiffusion.from_pretrained(sd_folder[0])
    for sampler in ("dpmpp_2m", "euler_ancestral", "heun"):
        x = ours("a car", sampler=sampler, steps=3, seed=1, precision="fp32")
        assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()


def test_a_folder_that_is_not_stable_diffusion_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no Stable Diffusion folder"):
        StableDiffusion.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        StableDiffusion.from_pretrained(tmp_path / "half")
