"""Autoencoder recipes, latents encoded once, and diffusion on them, end to end at tiny sizes on real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minidiffusion.config import apply_overrides, from_dict, load_preset
from minidiffusion.data.latents import LatentLoader, read_latents, write_latents
from minidiffusion.errors import ConfigError, DataError
from minidiffusion.recipes.autoencoder import (
    MLPAutoencoderTrainConfig,
    VAETrainConfig,
    train_mlp_autoencoder,
    train_vae,
)
from minidiffusion.recipes.diffusion import DiffusionConfig, train_diffusion

pytestmark = pytest.mark.integration  # real Fashion-MNIST and emoji data

TINY_VAE = ["model.channels=[8, 16, 16]", "model.norm_groups=4", "model.attention=false", "image_size=16",
            "batch_size=16", "train_limit=64", "flip=0"]


@pytest.fixture(scope="module")
def emoji_vae(tmp_path_factory):
    """A tiny emoji VAE (f = 4, 16x16 images -> 4x4x4 latents), trained for 2 epochs, and its summary."""
    out = tmp_path_factory.mktemp("vae") / "run"
    cfg = apply_overrides(from_dict(VAETrainConfig, load_preset("emoji-vae")), [*TINY_VAE, "epochs=2", "lr=3e-3"])
    return out, train_vae(cfg, out, progress=False)


def test_mlp_vae_recipe_records_bce_and_kld_and_learns(tmp_path, fashion_mnist_dir):
    cfg = apply_overrides(from_dict(MLPAutoencoderTrainConfig, load_preset("fmnist-vae")),
                          ["epochs=2", "train_limit=2048", "model.hidden=[64]", "model.latent=16"])
    res = train_mlp_autoencoder(cfg, tmp_path / "vae", progress=False)
    recs = [json.loads(line) for line in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["phase"] == "train"]
    assert {"bce", "kld"} <= set(train[0]) and train[-1]["bce"] < train[0]["bce"]
    assert res["valid_loss"] == pytest.approx(res["bce"] + res["kld"], rel=1e-5)  # kl_weight 1: loss = BCE + KLD
    assert (tmp_path / "vae" / "reconstructions.png").is_file()
    from minidiffusion.artifacts import read_component

    assert read_component(tmp_path / "vae").kind == "mlp-autoencoder"


def test_vae_recipe_learns_and_saves_its_scale_factor(emoji_vae):
    out, res = emoji_vae
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in recs if r["phase"] == "valid"]
    assert valid[-1]["rec"] < valid[0]["rec"] and valid[-1]["psnr"] > valid[0]["psnr"]
    from minidiffusion.data.sets import load_image_set
    from minidiffusion.pipelines.autoencoder import load_autoencoder
    from minidiffusion.recipes.autoencoder import scale_factor_of

    vae = load_autoencoder(out)
    assert vae.scale_factor == pytest.approx(res["scale_factor"]) and vae.downsample_factor == 4
    train = load_image_set("emoji", "train", image_size=16, label=None).images[:64]
    assert scale_factor_of(vae, train) == pytest.approx(res["scale_factor"], rel=1e-5)  # what the run computed
    with torch.no_grad():
        z = torch.cat([vae.encode_latents(train[i: i + 32].float() / 127.5 - 1, sample=True,
                                          generator=torch.Generator().manual_seed(0)) for i in (0, 32)])
    assert 0.8 < float(z.std()) < 1.25  # the scaled latents have about unit variance
    assert 5 < res["test_psnr"] < 60 and -1 <= res["test_ssim"] <= 1 and res["n_test"] == 368


def test_latents_round_trip_and_refusals(tmp_path):
    moments = np.random.default_rng(0).normal(size=(10, 2, 4, 3, 3)).astype(np.float32)
    labels = np.arange(20).reshape(10, 2)
    write_latents(tmp_path / "lat", moments, labels, 0.5, "a" * 64, data="emoji", label_kinds=["group", "subgroup"],
                  class_names={"group": list("abcdefghij"), "subgroup": [str(i) for i in range(20)]})
    back = read_latents(tmp_path / "lat", vae_sha256="a" * 64)
    assert isinstance(back.moments, np.memmap) and not back.moments.flags.writeable
    assert np.array_equal(back.moments, moments) and np.array_equal(back.labels, labels)
    assert back.scale_factor == 0.5 and back.latent_shape == (4, 3, 3)
    assert back.label_column("subgroup").tolist() == labels[:, 1].tolist()
    with pytest.raises(ConfigError, match="encoded by another VAE"):
        read_latents(tmp_path / "lat", vae_sha256="b" * 64)
    with pytest.raises(ConfigError, match="not 'colour'"):
        back.label_column("colour")
    (tmp_path / "lat" / "latents.f32").write_bytes((tmp_path / "lat" / "latents.f32").read_bytes()[:100])
    with pytest.raises(DataError, match="cut short or edited"):
        read_latents(tmp_path / "lat")
    with pytest.raises(DataError, match="holds no encoded latents"):
        read_latents(tmp_path / "nowhere")


def test_latent_loader_draws_fresh_latents_from_the_posterior():
    mean, logvar = torch.full((200, 1, 2, 2), 3.0), torch.full((200, 1, 2, 2), np.log(0.25))
    moments = torch.stack([mean, logvar], 1)
    loader = LatentLoader(moments, None, scale_factor=2.0, batch_size=200)
    torch.manual_seed(0)
    a, b = next(iter(loader))[0], next(iter(loader))[0]
    assert not torch.equal(a, b)
    assert float(a.mean()) == pytest.approx(6.0, abs=0.1) and float(a.std()) == pytest.approx(1.0, abs=0.1)
    exact = next(iter(LatentLoader(moments, None, scale_factor=2.0, sample=False, batch_size=10)))[0]
    assert torch.equal(exact, mean[:10] * 2)


def test_encode_then_latent_diffusion_then_sampling_decodes(emoji_vae, tmp_path):
    from minidiffusion.pipelines.autoencoder import encode_moments, encode_to_folder, load_autoencoder
    from minidiffusion.pipelines.image import DiffusionModel

    vae_dir, _ = emoji_vae
    info = encode_to_folder(vae_dir, "emoji", tmp_path / "lat", image_size=16)
    assert info["shape"] == [3287, 2, 4, 4, 4] and info["label_kinds"] == ["group", "subgroup"]
    lat = read_latents(tmp_path / "lat")
    from minidiffusion.data.sets import load_image_set

    first = load_image_set("emoji", "train", image_size=16, label=None).images[:8]
    assert np.allclose(lat.moments[:8], encode_moments(load_autoencoder(vae_dir), first), atol=1e-5)

    cfg = apply_overrides(from_dict(DiffusionConfig, load_preset("emoji-latent")),
                          [f"latents={tmp_path / 'lat'}", "epochs=1", "batch_size=64", "model.channels=[16, 32]",
                           "model.blocks=[1, 1]", "model.attention=[false, true]", "model.norm_groups=4", "steps=3"])
    res = train_diffusion(cfg, tmp_path / "ld", progress=False)
    assert res["steps"] > 0 and (tmp_path / "ld" / "vae.safetensors").is_file()
    saved = (tmp_path / "ld" / "model.toml").read_text()
    assert 'data = "emoji"' in saved and "image_size = 4" in saved
    model = DiffusionModel.from_run(tmp_path / "ld")
    assert model.vae is not None and len(model.class_names) == 9
    x, ids = model.sample(9, seed=1)
    y, _ = model.sample(9, seed=1)
    assert x.shape == (9, 3, 16, 16) and x.min() >= -1 and x.max() <= 1 and torch.equal(x, y)
    model.progression(tmp_path / "p.png", n=2, steps=3)  # previews are decoded too
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size[1] > 2 * 16 * 2


def test_a_diffusers_autoencoder_is_a_drop_in_for_encode_and_latent_diffusion(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from minidiffusion.pipelines.autoencoder import encode_to_folder
    from minidiffusion.pipelines.image import DiffusionModel

    torch.manual_seed(0)
    sd = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                 latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    sd.save_pretrained(tmp_path / "sd-vae")
    info = encode_to_folder(tmp_path / "sd-vae", "emoji", tmp_path / "lat", split="train", image_size=16)
    assert info["shape"] == [3287, 2, 4, 8, 8] and info["scale_factor"] == 0.5  # f = 2, the folder's own factor
    with torch.no_grad():
        from minidiffusion.data.sets import load_image_set

        x = load_image_set("emoji", "train", image_size=16, label=None).images[:4].float() / 127.5 - 1
        ref = sd.encode(x).latent_dist.mean
    got = torch.from_numpy(np.array(read_latents(tmp_path / "lat").moments[:4, 0]))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)  # encoded in batches of another size: float rounding
    cfg = apply_overrides(from_dict(DiffusionConfig, load_preset("emoji-latent")),
                          [f"latents={tmp_path / 'lat'}", "epochs=1", "train_limit=64", "batch_size=64",
                           "model.channels=[16, 32]", "model.blocks=[1, 1]", "model.attention=[false, true]",
                           "model.norm_groups=4", "steps=2", "conditional=false"])
    train_diffusion(cfg, tmp_path / "ld", progress=False)
    assert (tmp_path / "ld" / "vae" / "config.json").is_file()  # the run carries its diffusers VAE folder
    model = DiffusionModel.from_run(tmp_path / "ld")
    images, _ = model.sample(2, seed=0)
    assert images.shape == (2, 3, 16, 16)


def test_classifiers_on_emoji_pixels_and_on_latents(tmp_path):
    from minidiffusion.metrics.features import load_feature_network
    from minidiffusion.recipes.classifier import ClassifierConfig, train_classifier

    cfg = apply_overrides(from_dict(ClassifierConfig, load_preset("emoji-classifier")),
                          ["epochs=1", "image_size=16", "train_limit=256", "model.channels=[8, 16, 32]",
                           "model.blocks=[1, 1]"])
    res = train_classifier(cfg, tmp_path / "pixels", progress=False)
    net = load_feature_network(tmp_path / "pixels")
    assert net.image_shape == (3, 16, 16) and net.model.cfg.n_classes == 99 and 0 <= res["test_accuracy"] <= 1
    assert net(torch.rand(2, 3, 16, 16) * 2 - 1).shape == (2, 32)

    rng = np.random.default_rng(0)  # latents whose first channel's mean tells the class: easy to learn
    for split, n in (("train", 256), ("test", 64)):
        y = rng.integers(0, 4, n)
        moments = rng.normal(size=(n, 2, 4, 4, 4)).astype(np.float32) * 0.3
        moments[:, 0, 0] += y[:, None, None]
        moments[:, 1] = -4.0
        write_latents(tmp_path / "lat" / split, moments, np.stack([y, y], 1), 1.0, "c" * 64, data="emoji",
                      label_kinds=["group", "subgroup"], class_names={"group": list("abcd"), "subgroup": list("abcd")})
    cfg = apply_overrides(from_dict(ClassifierConfig, load_preset("emoji-latent-classifier")),
                          [f"latents={tmp_path / 'lat'}", "epochs=3", "batch_size=32", "model.channels=[16, 32, 64]"])
    res = train_classifier(cfg, tmp_path / "latents", progress=False)
    assert res["test_accuracy"] > 0.8  # chance is 0.25
    with pytest.raises(ConfigError, match="stem_init=pca works on images"):
        apply_overrides(cfg, ["stem_init=pca"])


def test_vae_with_gan_resumes_exactly(tmp_path, monkeypatch):
    """The discriminator and its optimizer are checkpointed: stop after epoch 1, resume, same weights as straight."""
    from safetensors.torch import load_file

    from minidiffusion.learner import Callback, CancelFitException
    from minidiffusion.recipes import autoencoder as ae_recipe

    cfg = apply_overrides(from_dict(VAETrainConfig, load_preset("emoji-vae")),
                          [*TINY_VAE, "train_limit=32", "epochs=2", "gan_weight=0.5", "gan_start=1",
                           "disc.channels=8", "disc.norm_groups=4", "precision=fp32"])
    train_vae(cfg, tmp_path / "straight", progress=False)

    class StopAtEpoch1(Callback):
        order = -100

        def before_batch(self, learn):
            if learn.training and learn.epoch == 1:
                raise CancelFitException()

    real_learner = ae_recipe._learner
    monkeypatch.setattr(ae_recipe, "_learner", lambda *a, **k: _with(real_learner(*a, **k), StopAtEpoch1()))
    train_vae(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(ae_recipe, "_learner", real_learner)
    train_vae(cfg, tmp_path / "resumed", resume=True, progress=False)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _with(learn, cb):
    learn.cbs.append(cb)
    return learn


def test_the_shipped_emoji_vae_reconstructs_held_out_emoji_and_scales_to_unit_std():
    from minidiffusion.data.emoji import load_emoji
    from minidiffusion.data.images import uint8_to_float
    from minidiffusion.metrics.image_quality import psnr
    from minidiffusion.pipelines.autoencoder import load_autoencoder

    vae = load_autoencoder("emoji-vae")
    x = uint8_to_float(load_emoji("test").images[::12])  # 31 held-out emoji
    with torch.no_grad():
        z = vae.encode(x).mode()
        x_hat = vae.decode(z).clamp(-1, 1)
    assert z.shape == (len(x), 4, 16, 16)  # f = 4
    assert float(psnr(x_hat, x).mean()) > 24.5  # 25.57 dB over all 368 (BENCHMARKS.md)
    assert 0.7 < float((z * vae.cfg.scale_factor).std()) < 1.3  # 1 / std of the training latents
