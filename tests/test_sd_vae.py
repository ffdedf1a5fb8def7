"""DiffusersVAE: a local diffusers AutoencoderKL behind our interface: diffusers' own numbers, scaled as SD does."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from minidiffusion.errors import CheckpointError, ConfigError
from minidiffusion.nn.vae import DiagonalGaussian
from minidiffusion.pipelines.sd_vae import DiffusersVAE, import_diffusers

diffusers = pytest.importorskip("diffusers")


def tiny_vae(**kw):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                   sample_size=16, **kw).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, the diffusers model itself) for a tiny VAE saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("sd_vae") / "vae"
    vae = tiny_vae(scaling_factor=0.3)
    vae.save_pretrained(folder)
    return folder, vae


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g)


def test_encode_and_decode_equal_diffusers_exactly(saved):
    folder, ref = saved
    ours = DiffusersVAE.from_pretrained(folder)
    assert ours.downsample_factor == 2 and ours.scale_factor == 0.3 and ours.shift_factor == 0.0
    assert not ours.training and next(ours.parameters()).dtype == torch.float32
    x, z = inputs()
    with torch.no_grad():
        post, dist = ours.encode(x), ref.encode(x).latent_dist
        assert isinstance(post, DiagonalGaussian) and post.shape == (2, 4, 8, 8)
        assert torch.equal(post.mean, dist.mean) and torch.equal(post.logvar, dist.logvar)
        assert torch.equal(post.std, dist.std)
        assert torch.equal(ours.decode(z), ref.decode(z).sample)
        x_hat, _ = ours(x, sample=False)
        assert x_hat.shape == x.shape and torch.equal(x_hat, ref.decode(dist.mean).sample)


def test_scaled_latents_follow_the_diffusers_pipelines(saved):
    folder, ref = saved
    ours = DiffusersVAE.from_pretrained(folder)
    x, z = inputs(1)
    s = ref.config.scaling_factor
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        # pipelines: latents = vae.encode(x).latent_dist.sample(generator) * scaling_factor
        assert torch.equal(ours.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(5)),
                           dist.sample(torch.Generator().manual_seed(5)) * s)
        assert torch.equal(ours.encode_latents(x), dist.mode() * s)
        # pipelines: image = vae.decode(latents / scaling_factor).sample
        assert torch.equal(ours.decode_latents(z), ref.decode(z / s).sample)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ours.decode_latents(z.bfloat16()).dtype == torch.float32


def test_a_shift_factor_is_subtracted_before_scaling(tmp_path):
    vae = tiny_vae(scaling_factor=1.5, shift_factor=0.25)
    vae.save_pretrained(tmp_path)
    ours = DiffusersVAE.from_pretrained(tmp_path)
    assert (ours.scale_factor, ours.shift_factor) == (1.5, 0.25)
    x, z = inputs(2)
    with torch.no_grad():
        assert torch.equal(ours.encode_latents(x), (vae.encode(x).latent_dist.mean - 0.25) * 1.5)
        assert torch.equal(ours.decode_latents(z), vae.decode(z / 1.5 + 0.25).sample)


def test_bad_folders_are_refused_with_a_sentence(tmp_path, saved):
    with pytest.raises(CheckpointError, match="is not a folder"):
        DiffusersVAE.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        DiffusersVAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not readable JSON"):
        DiffusersVAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="describes a UNet2DConditionModel, not an AutoencoderKL"):
        DiffusersVAE.from_pretrained(tmp_path)
    folder, _ = saved
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match=r"no \.safetensors weights \(pickled \.bin files are never loaded\)"):
        DiffusersVAE.from_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot load the diffusers AutoencoderKL in"):
        DiffusersVAE.from_pretrained(tmp_path)


def test_missing_diffusers_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_diffusers(name, *args, **kwargs):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError("No module named 'diffusers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    with pytest.raises(ConfigError, match=r"install the sd extra: pip install -e '\.\[sd\]'"):
        import_diffusers()
