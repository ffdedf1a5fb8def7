"""Every bad input to every command gets one sentence: exit status 2, one `minidiffusion: error:` line,
no traceback, no success line, and no output file left behind.

The table names a command line (with the bad file it needs, made here) and how the sentence starts
(a regular expression). A new command is not done until its rows are in this table. A second test
feeds a few hundred seeded combinations of the documented options with out-of-range, non-numeric,
empty, huge and NaN values and asserts the same properties.
"""

from __future__ import annotations

import io
import os
import random
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from minidiffusion.cli import main
from minidiffusion.config import apply_overrides
from minidiffusion.nn.unet import UNet
from minidiffusion.pipelines.image import DiffusionModelConfig, save_model

TINY = ["model.channels=[8, 16]", "model.blocks=[1, 1]", "model.attention=[false, false]", "model.norm_groups=4"]


def _tiny_model(run: Path, n_classes: int = 3, **over) -> Path:
    """Save an untrained tiny U-Net as a run's model (model.safetensors + model.toml); return the run dir."""
    cfg = apply_overrides(DiffusionModelConfig(), [*TINY, f"model.n_classes={n_classes}", "image_size=8",
                                                   *[f"{k}={v}" for k, v in over.items()]])
    torch.manual_seed(0)
    save_model(UNet(cfg.model), cfg, ["a", "b", "c"][:n_classes], run / "model.safetensors")
    return run


def _tiny_vae(run: Path, seed: int = 0) -> Path:
    """Save an untrained tiny KL autoencoder as a vae run's model; return the run dir."""
    from minidiffusion.artifacts import save_component
    from minidiffusion.nn.vae import AutoencoderKL, VAEConfig

    cfg = VAEConfig(channels=(8, 8), norm_groups=4, attention=False)
    torch.manual_seed(seed)
    run.mkdir(parents=True, exist_ok=True)
    save_component(run / "model.safetensors", AutoencoderKL(cfg).state_dict(), cfg, "vae")
    return run


def _make(tmp: Path, what: str) -> None:
    """Create the bad (or good) file a row needs, inside the test's folder."""
    run = tmp / "run"
    run.mkdir(exist_ok=True)
    good = _tiny_model(run) / "model.safetensors"
    if what == "truncated":
        good.write_bytes(good.read_bytes()[:1000])
    elif what == "empty":
        good.write_bytes(b"")
    elif what == "png":
        good.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    elif what == "pickle":
        torch.save({"w": torch.zeros(2)}, good)
    elif what == "toml-broken":
        (run / "model.toml").write_text("objective = [unclosed\n")
    elif what == "toml-unknown-key":
        (run / "model.toml").write_text((run / "model.toml").read_text().replace("objective =", "objectiv ="))
    elif what == "toml-missing":
        (run / "model.toml").unlink()
    elif what == "mismatch":
        cfg = (run / "model.toml").read_text().replace("channels = [8, 16]", "channels = [8, 24]")
        (run / "model.toml").write_text(cfg)
    elif what == "no-model":
        good.unlink()
        (run / "model.toml").unlink()
    elif what == "latents":
        _tiny_vae(tmp / "vae")
        import numpy as np

        from minidiffusion.data.latents import write_latents
        from minidiffusion.pipelines.autoencoder import weights_sha256

        write_latents(tmp / "lat", np.zeros((4, 2, 4, 2, 2), np.float32), np.zeros((4, 1), np.int64), 1.0,
                      "0" * 64, data="emoji", label_kinds=["group"], class_names={"group": ["x"]})
        _tiny_vae(tmp / "vae2", seed=1)
        assert weights_sha256(tmp / "vae2") != "0" * 64
        for split in ("train", "test"):  # a folder encoded by vae/, as `encode` writes it
            write_latents(tmp / "lat-ok" / split, np.zeros((4, 2, 4, 2, 2), np.float32), np.zeros((4, 1), np.int64),
                          1.0, weights_sha256(tmp / "vae"), data="emoji", vae=str(tmp / "vae"),
                          label_kinds=["group"], class_names={"group": ["x"]})
    elif what == "t2i":
        import test_text_to_image as t

        pipe = t.pipe.__wrapped__()
        from minidiffusion.artifacts import save_component
        from minidiffusion.paths import float32_state
        from minidiffusion.pipelines.text import save_text_encoder

        for f in run.iterdir():
            f.unlink()
        save_model(pipe.model.net, pipe.cfg, None, run / "model.safetensors")
        save_component(run / "vae.safetensors", float32_state(pipe.model.vae), pipe.model.vae.cfg, "vae")
        save_text_encoder(pipe.text_encoder, run)
    if what == "t2i-shapes":
        _make(tmp, "t2i")
        from PIL import Image

        (tmp / "shapes").mkdir(exist_ok=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (50 * i, 0, 0)).save(tmp / "shapes" / f"{i}.png")
        return
    elif what == "unconditional":
        for f in run.iterdir():
            f.unlink()
        _tiny_model(run, n_classes=0)
    (tmp / "afile").write_text("not a folder\n")
    (tmp / "weights.pt").write_bytes(b"\x80\x04not really a pickle")
    (tmp / "broken.toml").write_text("epochs = \n")
    (tmp / "classifier-run").mkdir(exist_ok=True)
    (tmp / "outdir.png").mkdir(exist_ok=True)
    (tmp / "noconfig").mkdir(exist_ok=True)
    (tmp / "noconfig" / "config.toml").write_text("recipe = [\n")
    (tmp / "stub-run" / "checkpoints" / "ckpt-000001-e0001-i000000").mkdir(parents=True, exist_ok=True)


# (id, argv, what to create, expected start of the sentence as a regex)
ROWS = [
    # no command / unknown command
    ("no-command", [], None, r"the following arguments are required: COMMAND"),
    ("unknown-command", ["paint"], None, r"argument COMMAND: invalid choice: 'paint'"),
    # train
    ("train-no-preset", ["train", "--out", "o"], None, r"give a preset to train"),
    ("train-unknown-preset", ["train", "nosuch", "--out", "o"], None, r"unknown preset 'nosuch'"),
    ("train-preset-missing-file", ["train", "nosuch.toml", "--out", "o"], None, r"preset file nosuch.toml does not exist"),
    ("train-preset-not-toml", ["train", "broken.toml", "--out", "o"], None, r"preset 'broken.toml' is not valid TOML"),
    ("train-epochs-negative", ["train", "fmnist", "--out", "o", "epochs=-1"], None,
     r"epochs must be an integer in 1\.\.100000, got -1"),
    ("train-epochs-zero", ["train", "fmnist", "--out", "o", "epochs=0"], None, r"epochs must be an integer"),
    ("train-epochs-text", ["train", "fmnist", "--out", "o", "epochs=many"], None,
     r"config key 'epochs' expects int, got 'many'"),
    ("train-minutes-nan", ["train", "fmnist", "--out", "o", "minutes=nan"], None, r"minutes must be a number"),
    ("train-lr-zero", ["train", "fmnist", "--out", "o", "lr=0"], None, r"lr must be a number in \(0, 10\]"),
    ("train-batch-zero", ["train", "fmnist", "--out", "o", "batch_size=0"], None, r"batch_size must be an integer"),
    ("train-seed-negative", ["train", "fmnist", "--out", "o", "seed=-3"], None, r"seed must be an integer"),
    ("train-cond-drop", ["train", "fmnist", "--out", "o", "cond_drop=1"], None, r"cond_drop must be a number in \[0, 1\)"),
    ("train-unknown-key", ["train", "fmnist", "--out", "o", "epoch=3"], None, r"unknown config key 'epoch'; valid keys"),
    ("train-not-key-value", ["train", "fmnist", "--out", "o", "fast"], None,
     r"'fast' is neither an option nor a key=value override"),
    ("train-not-a-section", ["train", "fmnist", "--out", "o", "lr.x=1"], None, r"override 'lr.x=1': 'lr' is not"),
    ("train-unknown-flag", ["train", "fmnist", "--out", "o", "--fast"], None, r"unrecognized arguments: --fast"),
    ("train-bad-channels", ["train", "fmnist", "--out", "o", "model.channels=[7]"], None, r"invalid config model"),
    ("train-bad-groups", ["train", "fmnist", "--out", "o", "model.norm_groups=3"], None, r"invalid config model.*can't split"),
    ("train-head-dim-zero", ["train", "fmnist", "--out", "o", "model.head_dim=0"], None, r"model\.head_dim must be"),
    ("train-dropout", ["train", "fmnist", "--out", "o", "model.dropout=1.5"], None, r"model\.dropout must be"),
    ("train-sampler", ["train", "fmnist", "--out", "o", "sampler=magic"], None, r"sampler must be one of"),
    ("train-steps", ["train", "fmnist", "--out", "o", "steps=0"], None, r"steps must be an integer in 1\.\.1000"),
    ("train-objective", ["train", "fmnist", "--out", "o", "objective=flow"], None, r"objective must be one of"),
    ("train-precision", ["train", "fmnist", "--out", "o", "precision=fp8"], None, r"precision must be auto, bf16"),
    ("train-device", ["train", "fmnist", "--out", "o", "device=tpu"], None, r"unknown device 'tpu'"),
    ("train-device-missing", ["train", "fmnist", "--out", "o", "device=cuda"] if not torch.cuda.is_available() else
     ["train", "fmnist", "--out", "o", "device=cuda:99"], None, r"device 'cuda"),
    ("train-fid-needs-fmnist", ["train", "fmnist", "--out", "o", "data=afile", "fid_every=1"], None,
     r"fid_every needs data=fashion-mnist"),
    ("train-image-size", ["train", "fmnist", "--out", "o", "image_size=30"], None, r"image_size 30 is not a multiple of 4"),
    ("train-no-images", ["train", "fmnist", "--out", "o", "data=classifier-run", "conditional=false"], None,
     r"no \.png/\.jpg/\.jpeg images found"),
    ("train-out-is-file", ["train", "fmnist", "--out", "afile", "epochs=1"], None, r"afile exists and is not a directory"),
    ("train-resume-nothing", ["train", "fmnist", "--out", "o", "--resume"], None, r"cannot resume: o holds no checkpoint"),
    ("train-resume-bad-config", ["train", "--out", "noconfig", "--resume"], None, r"preset 'noconfig/config.toml' is not valid TOML"),
    ("train-exists", ["train", "fmnist", "--out", "stub-run"], None, r"stub-run already holds a run"),
    ("train-wrong-recipe-key", ["train", "fmnist", "--out", "o", "alternate_flip=true"], None,
     r"unknown config key 'alternate_flip'"),
    # train-classifier (and `train fmnist-classifier`)
    ("clf-epochs-zero", ["train-classifier", "--out", "o", "--epochs", "0"], None,
     r"argument --epochs: must be an integer in 1\.\.100000, got '0'"),
    ("clf-epochs-text", ["train-classifier", "--out", "o", "--epochs", "five"], None, r"argument --epochs: must be"),
    ("clf-diffusion-preset", ["train-classifier", "--out", "o", "--preset", "fmnist"], None,
     r"preset 'fmnist' trains a diffusion model, not a classifier"),
    ("clf-removed-option", ["train", "fmnist-classifier", "--out", "o", "model.se=8"], None,
     r"config key 'model\.se' = 8 was an experiment that did not beat the preset"),
    ("clf-removed-flip", ["train-classifier", "--out", "o", "alternate_flip=true"], None, r"config key 'alternate_flip'"),
    ("clf-pct-start", ["train", "fmnist-classifier", "--out", "o", "pct_start=1"], None, r"pct_start must be"),
    ("clf-optimizer", ["train", "fmnist-classifier", "--out", "o", "optimizer=lion"], None, r"optimizer must be one of"),
    ("clf-no-out", ["train-classifier"], None, r"the following arguments are required: --out"),
    ("serve-port", ["serve", "--port", "99999"], None, r"argument --port: must be an integer in 0\.\.65535"),
    ("upscale-missing-image", ["upscale", "nowhere.png", "--out", "o.png"], None, r"no image file at nowhere\.png"),
    ("upscale-no-out", ["upscale", "nowhere.png"], None, r"the following arguments are required: --out"),
    # sample: model files
    ("sample-truncated", ["sample", "run"], "truncated", r"run/model\.safetensors is not a readable safetensors file"),
    ("sample-empty", ["sample", "run"], "empty", r"run/model\.safetensors is empty"),
    ("sample-not-safetensors", ["sample", "run"], "png", r"run/model\.safetensors is not a readable safetensors"),
    ("sample-pickle-inside", ["sample", "run"], "pickle", r"refusing to load run/model\.safetensors: it is a Python pickle"),
    ("sample-toml-broken", ["sample", "run"], "toml-broken", r"run/model\.toml is not valid TOML"),
    ("sample-toml-unknown", ["sample", "run"], "toml-unknown-key", r"run/model\.toml: unknown config key 'objectiv'"),
    ("sample-toml-missing", ["sample", "run"], "toml-missing", r"missing config run/model\.toml"),
    ("sample-mismatch", ["sample", "run"], "mismatch", r"run/model\.safetensors \(with its config .*\) does not match"),
    ("sample-no-model", ["sample", "run"], "no-model", r"run holds no model\.safetensors"),
    ("sample-no-run", ["sample", "nowhere"], None, r"nowhere does not exist: it is no run directory"),
    ("sample-run-is-file", ["sample", "afile"], None, r"afile is a file"),
    ("sample-neither", ["sample"], None, r"give a run directory or --pretrained NAME"),
    ("sample-both", ["sample", "run", "--pretrained", "fmnist"], "good", r"give either a run directory or --pretrained"),
    ("sample-unknown-pretrained", ["sample", "--pretrained", "nope"], None, r"no pretrained model 'nope'; shipped: fmnist"),
    # sample: options
    ("sample-n-zero", ["sample", "--pretrained", "fmnist", "--n", "0"], None,
     r"argument --n: must be an integer in 1\.\.100000, got '0'"),
    ("sample-n-huge", ["sample", "--pretrained", "fmnist", "--n", "10000000000"], None, r"argument --n: must be"),
    ("sample-n-text", ["sample", "--pretrained", "fmnist", "--n", "ten"], None, r"argument --n: must be an integer"),
    ("sample-steps-zero", ["sample", "--pretrained", "fmnist", "--steps", "0"], None,
     r"argument --steps: must be an integer in 1\.\.1000, got '0'"),
    ("sample-steps-huge", ["sample", "--pretrained", "fmnist", "--steps", "5000"], None, r"argument --steps: must be"),
    ("sample-guidance-nan", ["sample", "--pretrained", "fmnist", "--guidance", "nan"], None,
     r"argument --guidance: must be a number in \[0, 100\], got 'nan'"),
    ("sample-guidance-inf", ["sample", "--pretrained", "fmnist", "--guidance", "inf"], None, r"argument --guidance"),
    ("sample-guidance-negative", ["sample", "--pretrained", "fmnist", "--guidance", "-2"], None, r"argument --guidance"),
    ("sample-seed-negative", ["sample", "--pretrained", "fmnist", "--seed", "-1"], None, r"argument --seed: must be"),
    ("sample-seed-huge", ["sample", "--pretrained", "fmnist", "--seed", str(2**64)], None, r"argument --seed: must be"),
    ("sample-sampler", ["sample", "--pretrained", "fmnist", "--sampler", "magic"], None,
     r"argument --sampler: invalid choice: 'magic'"),
    ("sample-precision", ["sample", "--pretrained", "fmnist", "--precision", "fp8"], None, r"argument --precision"),
    ("sample-device", ["sample", "--pretrained", "fmnist", "--device", "tpu"], None, r"unknown device 'tpu'"),
    ("sample-label-unknown", ["sample", "--pretrained", "fmnist", "--label", "zebra"], None, r"unknown label 'zebra'"),
    ("sample-label-index", ["sample", "--pretrained", "fmnist", "--label", "10"], None,
     r"label index 10 is out of range; choose 0\.\.9"),
    ("sample-label-unconditional", ["sample", "run", "--label", "a"], "unconditional", r"this model is unconditional"),
    ("sample-out-dir", ["sample", "--pretrained", "fmnist", "--out", "outdir.png"], None, r"cannot write outdir\.png: it is a folder"),
    ("sample-out-under-file", ["sample", "--pretrained", "fmnist", "--out", "afile/x.png"], None,
     r"cannot write afile/x\.png: afile is a file, not a folder"),
    ("sample-out-not-png", ["sample", "--pretrained", "fmnist", "--out", "grid.jpg"], None, r"the grid is a PNG"),
    ("sample-out-unwritable", ["sample", "--pretrained", "fmnist", "--n", "1", "--steps", "1", "--out",
                               "/proc/minidiffusion-test.png"], None, r"cannot write /proc/minidiffusion-test"),
    # text-to-image sampling
    ("t2i-no-prompt", ["sample", "run"], "t2i", r"this is a text-to-image model: give --prompt"),
    ("t2i-label", ["sample", "run", "--prompt", "a", "--label", "b"], "t2i", r"a text-to-image model takes --prompt"),
    ("t2i-strength", ["sample", "run", "--prompt", "a", "--strength", "1.5"], "t2i", r"argument --strength: must be"),
    ("t2i-init-missing", ["sample", "run", "--prompt", "a", "--init-image", "nowhere.png"], "t2i",
     r"init image nowhere\.png does not exist"),
    ("t2i-init-not-image", ["sample", "run", "--prompt", "a", "--init-image", "broken.toml"], "t2i",
     r"init image broken\.toml cannot be read as an image"),
    ("t2i-out-not-png", ["sample", "run", "--prompt", "a", "--out", "x.jpg"], "t2i", r"the grid is a PNG"),
    ("t2i-steps", ["sample", "run", "--prompt", "a", "--steps", "0"], "t2i", r"argument --steps: must be"),
    ("sd-missing", ["sample", "--sd", "nowhere", "--prompt", "a"], None, r"no Stable Diffusion folder at nowhere"),
    ("sd-no-index", ["sample", "--sd", "classifier-run", "--prompt", "a"], None,
     r"classifier-run/model_index\.json is missing"),
    ("sd-no-prompt", ["sample", "--sd", "classifier-run"], None, r"a Stable Diffusion model draws a --prompt"),
    ("sd-and-run", ["sample", "run", "--sd", "classifier-run", "--prompt", "a"], "good", r"give one model"),
    ("ti-no-images", ["textual-inversion", "run", "--token", "<x>", "--init-word", "cat", "--out", "e.safetensors"],
     "t2i", r"the following arguments are required: --images"),
    ("ti-missing-images", ["textual-inversion", "run", "--images", "nowhere", "--token", "<x>", "--init-word", "cat",
                           "--out", "e.safetensors"], "t2i", r"image folder nowhere does not exist"),
    ("ti-empty-images", ["textual-inversion", "run", "--images", "classifier-run", "--token", "<x>", "--init-word",
                         "cat", "--out", "e.safetensors"], "t2i", r"no \.png/\.jpg/\.jpeg images found"),
    ("ti-vectors", ["textual-inversion", "run", "--images", "x", "--token", "<x>", "--init-word", "cat", "--vectors",
                    "0", "--out", "e.safetensors"], "t2i", r"argument --vectors: must be"),
    ("ti-not-t2i", ["textual-inversion", "run", "--images", "x", "--token", "<x>", "--init-word", "cat", "--out",
                    "e.safetensors"], "good", r"run is not a text-to-image run"),
    ("ti-two-models", ["textual-inversion", "run", "--pretrained", "emoji", "--images", "x", "--token", "<x>",
                       "--init-word", "cat", "--out", "e.safetensors"], "t2i", r"give one text-to-image model"),
    ("ti-out-dir", ["textual-inversion", "run", "--images", "x", "--token", "<x>", "--init-word", "cat", "--out",
                    "outdir.png"], "t2i", r"cannot write outdir\.png: it is a folder"),
    ("ti-token-space", ["textual-inversion", "run", "--images", "shapes", "--token", "my cat", "--init-word", "cat",
                        "--out", "e.safetensors"], "t2i-shapes", r"cannot add token 'my cat'"),
    ("sample-embedding-missing", ["sample", "run", "--prompt", "a", "--embedding", "nowhere.safetensors"], "t2i",
     r"no weights file at nowhere\.safetensors"),
    ("sample-embedding-not-one", ["sample", "run", "--prompt", "a", "--embedding", "run/vae.safetensors"], "t2i",
     r"run/vae\.safetensors is not an embedding"),
    ("db-no-class", ["dreambooth", "run", "--images", "x", "--out", "db"], "t2i",
     r"the following arguments are required: --class-word"),
    ("db-prior", ["dreambooth", "run", "--images", "x", "--class-word", "dog", "--prior-weight", "-1", "--out", "db"],
     "t2i", r"argument --prior-weight: must be"),
    ("db-sd", ["dreambooth", "--sd", "x", "--images", "x", "--class-word", "dog", "--out", "db"], None,
     r"dreambooth fine-tunes our own text-to-image runs"),
    ("db-out-full", ["dreambooth", "run", "--images", "shapes", "--class-word", "dog", "--out", "stub-run"],
     "t2i-shapes", r"stub-run already holds files"),
    ("prompt-for-label-model", ["sample", "--pretrained", "fmnist", "--prompt", "a shoe"], None,
     r"--prompt, --negative-prompt and --init-image need a text-to-image model"),
    ("t2i-no-latents", ["train", "emoji-t2i", "--out", "o", "latents="], None, r"text-to-image trains on encoded latents"),
    ("t2i-latents-no-vae", ["train", "emoji-t2i", "--out", "o", "latents=lat"], "latents",
     r"the latents in lat do not name their autoencoder; pass vae=PATH"),
    ("t2i-no-clip", ["train", "emoji-t2i", "--out", "o", "latents=lat-ok", "text_encoder=nowhere"], "latents",
     r"no text encoder at nowhere"),
    ("clip-data", ["train", "emoji-clip", "--out", "o", "data=photos"], None, r"the clip recipe trains on captioned emoji"),
    ("clip-batch", ["train", "emoji-clip", "--out", "o", "batch_size=1"], None, r"batch_size must be an integer in 2"),
    # eval
    ("eval-n-one", ["eval", "--pretrained", "fmnist", "--n", "1"], None,
     r"argument --n/--samples: must be an integer in 2\.\.60000, got '1'"),
    ("eval-n-zero", ["eval", "--pretrained", "fmnist", "--n", "0"], None, r"argument --n/--samples: must be"),
    ("eval-features-pickle", ["eval", "--pretrained", "fmnist", "--features", "weights.pt"], None,
     r"refusing to load weights\.pt: it is a Python pickle"),
    ("eval-features-missing", ["eval", "--pretrained", "fmnist", "--features", "nowhere.safetensors"], None,
     r"no feature network weights at nowhere\.safetensors"),
    ("eval-features-no-model", ["eval", "--pretrained", "fmnist", "--features", "classifier-run"], None,
     r"no feature network weights at classifier-run/model\.safetensors"),
    ("eval-features-wrong-kind", ["eval", "--pretrained", "fmnist", "--features", "run"], "good",
     r"run/model\.safetensors holds a diffusion model, not a classifier model"),
    ("eval-truncated", ["eval", "run"], "truncated", r"run/model\.safetensors is not a readable safetensors file"),
    ("eval-steps", ["eval", "--pretrained", "fmnist", "--steps", "-4"], None, r"argument --steps: must be"),
    ("eval-unknown-pretrained", ["eval", "--pretrained", "nope"], None, r"no pretrained model 'nope'"),
    # encode
    ("encode-no-vae", ["encode", "--out", "o"], None, r"the following arguments are required: vae"),
    ("encode-no-out", ["encode", "run"], "good", r"the following arguments are required: --out"),
    ("encode-missing", ["encode", "nowhere", "--out", "o"], None, r"no autoencoder at nowhere"),
    ("encode-diffusion-model", ["encode", "run", "--out", "o"], "good", r"run/model\.safetensors holds a diffusion"),
    ("encode-pickle", ["encode", "weights.pt", "--out", "o"], None, r"no autoencoder at weights\.pt"),
    ("encode-truncated", ["encode", "run", "--out", "o"], "truncated", r"run/model\.safetensors is not a readable"),
    ("encode-size", ["encode", "run", "--image-size", "0", "--out", "o"], "good", r"argument --image-size: must be"),
    ("encode-split", ["encode", "run", "--split", "valid", "--out", "o"], "good", r"argument --split: invalid choice"),
    ("encode-out-file", ["encode", "vae", "--out", "afile"], "latents", r"cannot write afile/train/latents\.f32: afile is a file"),
    ("encode-no-data", ["encode", "vae", "--data", "nowhere", "--out", "o"], "latents", r"image folder nowhere does not exist"),
    ("encode-device", ["encode", "vae", "--device", "tpu", "--out", "o"], "latents", r"unknown device 'tpu'"),
    # latent diffusion
    ("latent-no-latents", ["train", "emoji-latent", "--out", "o", "latents=nowhere"], None,
     r"nowhere holds no encoded latents \(latents\.json is missing\)"),
    ("latent-other-vae", ["train", "emoji-latent", "--out", "o", "latents=lat", "vae=vae2"], "latents",
     r"the latents in lat were encoded by another VAE"),
    ("latent-missing-vae", ["train", "emoji-latent", "--out", "o", "latents=lat", "vae=nowhere"], "latents",
     r"no autoencoder at nowhere"),
    ("latent-label", ["train", "emoji-latent", "--out", "o", "latents=lat", "label=colour"], "latents",
     r"label must be one of group, subgroup"),
    ("vae-bad-loss", ["train", "emoji-vae", "--out", "o", "rec_loss=l3"], None, r"rec_loss must be one of l1, mse"),
    ("vae-image-size", ["train", "emoji-vae", "--out", "o", "image_size=30"], None, r"image_size 30 is not a multiple"),
    ("vae-perceptual-missing", ["train", "emoji-vae", "--out", "o", "perceptual=nowhere"], None,
     r"no feature network weights at nowhere"),
    ("ae-kl-weight", ["train", "fmnist-vae", "--out", "o", "kl_weight=-1"], None, r"kl_weight must be"),
    ("ae-latent", ["train", "fmnist-ae", "--out", "o", "model.latent=0"], None, r"model\.latent must be"),
    # data
    ("data-unknown", ["data", "imagenet"], None, r"argument dataset: invalid choice: 'imagenet'"),
    ("data-dest-file", ["data", "fashion-mnist", "--dest", "afile/sub"], None, r"cannot create the download folder afile/sub"),
    ("data-bad-url", ["data", "fashion-mnist", "--dest", "dl", "--url", "file:///nonexistent-mirror/"], None,
     r"could not download file:///nonexistent-mirror/"),
]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run the command line in this process; return (status, stdout, stderr). A traceback escapes as an exception."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _no_training(monkeypatch):
    """Bad input must be refused before training starts: a row that reaches Learner.fit fails at once."""
    from minidiffusion.learner import Learner

    def refuse(*args, **kwargs):
        raise AssertionError("training started: the input was not refused up front")

    monkeypatch.setattr(Learner, "fit", refuse)


def assert_refused(code: int, out: str, err: str, pattern: str | None = None) -> None:
    """Exit status 2, exactly one error line (matching `pattern` when given), no traceback, no JSON success line."""
    lines = [line for line in err.splitlines() if line.startswith("minidiffusion: error: ")]
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    assert not out.strip().endswith("}"), out  # the success line is a JSON object
    if pattern is not None:
        message = lines[0][len("minidiffusion: error: "):]
        assert re.match(pattern, message), message
        assert "\n" not in message and len(message) < 600


@pytest.mark.parametrize("argv,make,pattern", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_with_one_sentence(tmp_path, monkeypatch, argv, make, pattern):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    _make(tmp_path, make or "good")
    before = _tree(tmp_path)
    code, out, err = run_cli(argv)
    assert_refused(code, out, err, pattern)
    after = _tree(tmp_path)
    assert after == before, sorted(set(after) ^ set(before))  # nothing written, nothing changed


def test_the_table_covers_every_command():
    from minidiffusion.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = {r[1][0] for r in ROWS if r[1]}
    assert set(sub.choices) <= commands, set(sub.choices) - commands


def test_the_issue_rows_are_in_the_table():
    ids = {r[0] for r in ROWS}
    assert {"sample-truncated", "sample-n-zero", "sample-steps-zero", "sample-guidance-nan", "eval-n-one",
            "train-epochs-negative", "eval-features-pickle"} <= ids


def test_the_real_entry_point_refuses_too(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "minidiffusion", "sample", "--pretrained", "fmnist", "--steps", "0"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert_refused(r.returncode, r.stdout, r.stderr, r"argument --steps")
    assert list(tmp_path.iterdir()) == []


# --- random garbage ------------------------------------------------------------------------------

BAD_INT = ["", "x", "1.5", "nan", "inf", "-inf", "1e3", "99999999999999999999999", "0x10", "--", "½", " "]
BAD_FLOAT = ["", "x", "nan", "inf", "-inf", "1e999", "--", "1,5", "one"]
OPTIONS = {  # option -> values that are all invalid for it (on top of BAD_INT / BAD_FLOAT)
    "sample": {"--n": BAD_INT + ["0", "-1", "100001"], "--steps": BAD_INT + ["0", "-5", "1001"],
               "--seed": BAD_INT + ["-1", str(2**63)], "--guidance": BAD_FLOAT + ["-0.5", "100.5", "1e10"],
               "--sampler": ["", "Euler", "dpm++", "ddim2"], "--precision": ["", "FP32", "bf32"],
               "--device": ["tpu", "gpu", "cuda:x"] + (["cuda", "mps"] if not torch.cuda.is_available() else [])},
    "eval": {"--n": BAD_INT + ["0", "1", "60001"], "--steps": BAD_INT + ["0", "1001"], "--seed": BAD_INT + ["-2"],
             "--guidance": BAD_FLOAT + ["-1", "101"], "--sampler": ["x"], "--precision": ["16"]},
    "train-classifier": {"--epochs": BAD_INT + ["0", "-1", "100001"]},
}
KEYS = {  # config key -> invalid values (TOML literals), for `train PRESET --out DIR key=value`
    "epochs": ["0", "-1", "1.5", "nan", "\"5\"", "[1]", "100001", "true"],
    "minutes": ["-1", "nan", "inf", "\"ten\"", "1e9"],
    "batch_size": ["0", "-64", "70000", "nan"],
    "lr": ["0", "-1e-3", "nan", "inf", "11"],
    "weight_decay": ["-0.1", "nan"],
    "seed": ["-1", "1.5", "nan"],
    "steps": ["0", "1001", "-3", "2.5"],
    "guidance": ["nan", "-1", "inf", "200"],
    "model.dropout": ["1", "-0.1", "nan"],
    "model.head_dim": ["0", "-8"],
    "model.norm_groups": ["0", "5", "-1"],
    "model.mid_blocks": ["-1", "100"],
    "model.channels": ["[]", "[0, 8]", "[-8, 16]", "[8.5, 16]", "\"wide\""],
}
DIFFUSION_ONLY = {"ema_decay": ["1", "-0.1", "nan"], "cond_drop": ["1", "-0.5"], "fid_n": ["1", "0"],
                  "sigma_data": ["0", "-1", "nan"], "time_scale": ["0", "nan"], "min_alpha_bar": ["1", "-0.1"],
                  "sigma_min": ["0", "100"], "timesteps": ["1", "0", "1e6"], "beta_end": ["1", "0"],
                  "objective": ["\"flow\"", "1"], "sampler": ["\"magic\""], "image_size": ["0", "30", "-32"]}
CLASSIFIER_ONLY = {"label_smoothing": ["1", "-0.1"], "pct_start": ["0", "1"], "adam_beta2": ["1", "0"],
                   "pad": ["-1", "100"], "flip": ["1.5", "-1"], "optimizer": ["\"adam\""], "stem_init": ["\"zero\""],
                   "model.n_classes": ["0", "-1"], "model.stem_blocks": ["-1"]}


def _garbage_cases(n: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        kind = rng.choice(["sample", "eval", "train-classifier", "train", "train", "train-fmnist-classifier"])
        if kind in OPTIONS:
            opts = OPTIONS[kind]
            bad = rng.choice(sorted(opts))
            argv = [kind, "--pretrained", "fmnist"] if kind != "train-classifier" else [kind, "--out", "o"]
            others = [o for o in opts if o != bad and o in ("--seed",)]
            for o in others:  # a valid value beside the bad one
                argv += [o, "3"]
            argv += [bad, rng.choice(opts[bad])]
            if rng.random() < 0.3:  # the same option twice: the last (bad) one wins
                argv = [*argv[:-2], bad, "1", bad, argv[-1]]
            cases.append(argv)
            continue
        classifier = kind == "train-fmnist-classifier"
        table = {**KEYS, **(CLASSIFIER_ONLY if classifier else DIFFUSION_ONLY)}
        if classifier:
            table = {k: v for k, v in table.items() if k not in ("steps", "guidance", "model.head_dim",
                                                                 "model.norm_groups", "model.mid_blocks")}
        key = rng.choice(sorted(table))
        preset = "fmnist-classifier" if classifier else rng.choice(["fmnist", "fmnist-ddpm", "fmnist-cosine"])
        valid = rng.sample(["epochs=2", "seed=4", "batch_size=32"], k=rng.randint(0, 2))
        cases.append(["train", preset, "--out", "o", *valid, f"{key}={rng.choice(table[key])}"])
    return cases


GARBAGE = _garbage_cases(300)


def test_random_garbage_is_refused_with_one_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    assert len({tuple(c) for c in GARBAGE}) > 150  # a real variety, not one case repeated
    for argv in GARBAGE:
        code, out, err = run_cli(argv)
        try:
            assert_refused(code, out, err)
        except AssertionError as e:
            raise AssertionError(f"{argv}: {e}") from None
        assert os.listdir(tmp_path) == [], (argv, os.listdir(tmp_path))
