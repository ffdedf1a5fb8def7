"""The `minidiffusion` command: train diffusion models and classifiers, sample images, score them.

Every command ends by printing one JSON line summarising its result. Bad input (an option out of
its range, a damaged file, a path that cannot be written) stops with one sentence on stderr,
`minidiffusion: error: ...`, and exit status 2, before anything is written. The commands are
thin: each parses its options and calls one library function (recipes, pipelines, metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import in_range, range_spec
from .errors import MinidiffusionError

__all__ = ["main", "build_parser"]

DESCRIPTION = """\
Train diffusion models and classifiers on your images, sample from them, and measure them.

  minidiffusion train fmnist --out runs/fm minutes=10   train the default Fashion-MNIST model
  minidiffusion sample --pretrained fmnist --label sneaker --n 16 --out sneakers.png
  minidiffusion eval runs/fm --n 2048                  FID/KID against the test set
  minidiffusion train fmnist-classifier --out runs/clf  the ResNet classifier
  minidiffusion serve                                  a web page at http://127.0.0.1:7860/

Run `minidiffusion COMMAND --help` for a command's options. Presets: `minidiffusion train --help`.
"""
PRECISION_HELP = "network precision while sampling (auto: bf16 on CUDA and CPUs with AVX512-bf16, else fp32)"


class UsageError(Exception):
    """Bad command-line syntax or an option value out of range (argparse's errors, as one sentence)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence and exit 2 (main), instead of argparse's usage dump
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _number(lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    """An argparse type: a number within a range, refused with the range in words."""
    spec = range_spec(lo, hi, lo_open, hi_open, integer)

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {spec}, got {text!r}") from None
        if not in_range(value, lo, hi, lo_open, hi_open, integer):
            raise argparse.ArgumentTypeError(f"must be {spec}, got {text!r}")
        return value

    parse.__name__ = "integer" if integer else "number"
    return parse


def _cmd_train(args) -> dict:
    from .recipes import train

    preset, overrides = args.preset, list(args.overrides)
    if preset is not None and "=" in preset and not preset.endswith(".toml"):
        preset, overrides = None, [preset, *overrides]  # `train --resume --out DIR key=value`: no preset given
    return train(preset, args.out, overrides, resume=args.resume, replace=args.replace, progress=not args.quiet)


def _cmd_train_classifier(args) -> dict:
    from .recipes import train

    overrides = list(args.overrides) + ([f"epochs={args.epochs}"] if args.epochs is not None else [])
    preset = args.preset
    if preset is None and not (args.resume and not overrides):
        preset = "fmnist-classifier"  # a bare --resume continues with the run's own settings
    return train(preset, args.out, overrides, resume=args.resume, replace=args.replace, progress=not args.quiet,
                 recipe="classifier")


def _load_model(args):
    from .device import resolve_device
    from .pipelines.image import DiffusionModel

    device = resolve_device(args.device)
    if args.pretrained and args.run_dir:
        raise MinidiffusionError("give either a run directory or --pretrained NAME, not both")
    if args.pretrained:
        return DiffusionModel.from_pretrained(args.pretrained, device=device)
    if args.run_dir:
        return DiffusionModel.from_run(args.run_dir, device=device)
    raise MinidiffusionError("give a run directory or --pretrained NAME (e.g. --pretrained fmnist)")


def _is_text_to_image(args) -> bool:
    from importlib import resources
    from pathlib import Path

    if args.pretrained:
        folder = Path(str(resources.files("minidiffusion.assets"))) / args.pretrained
    else:
        folder = Path(args.run_dir or "")
    return (folder / "text_encoder.toml").is_file()


def _cmd_sample(args) -> dict:
    from .pipelines.image import check_sampling
    from .pipelines.outputs import prompt_to_files, sample_to_files

    if args.n is None:
        args.n = 4 if args.prompt is not None else 40
    check_sampling(args.sampler, args.steps, args.guidance, args.n, args.seed)
    if args.schedule is not None and (args.sd is not None or args.prompt is not None or _is_text_to_image(args)):
        raise MinidiffusionError("--schedule is for image models (sample RUN or --pretrained fmnist); a text-to-image "
                                 "pipeline samples on its model's own sigmas")
    if args.sd is not None:
        if args.run_dir or args.pretrained:
            raise MinidiffusionError("give one model: a run directory, --pretrained NAME or --sd DIR")
        if args.prompt is None:
            raise MinidiffusionError("a Stable Diffusion model draws a --prompt \"...\"")
        from .device import resolve_device
        from .pipelines.outputs import prompt_to_files
        from .pipelines.sd import StableDiffusion

        pipe = StableDiffusion.from_pretrained(args.sd, resolve_device(args.device))
        for emb in args.embedding or []:
            pipe.load_embedding(emb)
        return prompt_to_files(pipe, args.out, args.prompt, n=args.n, negative_prompt=args.negative_prompt,
                               seed=args.seed, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                               init_image=args.init_image, strength=args.strength, precision=args.precision)
    if _is_text_to_image(args):
        from .device import resolve_device
        from .pipelines.text_to_image import TextToImage

        if args.prompt is None:
            raise MinidiffusionError("this is a text-to-image model: give --prompt \"...\" (and optionally "
                                     "--negative-prompt, --init-image with --strength)")
        if args.label:
            raise MinidiffusionError("a text-to-image model takes --prompt, not --label")
        device = resolve_device(args.device)
        pipe = (TextToImage.from_pretrained(args.pretrained, device) if args.pretrained
                else TextToImage.from_run(args.run_dir, device))
        for emb in args.embedding or []:
            pipe.load_embedding(emb)
        return prompt_to_files(pipe, args.out, args.prompt, n=args.n, negative_prompt=args.negative_prompt,
                               seed=args.seed, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                               init_image=args.init_image, strength=args.strength, precision=args.precision)
    if args.prompt is not None or args.negative_prompt is not None or args.init_image is not None or args.embedding:
        raise MinidiffusionError("--prompt, --negative-prompt and --init-image need a text-to-image model; this one "
                                 "takes --label (or nothing)")
    model = _load_model(args)
    audio = _sample_audio(model, args)
    if audio is not None:
        return audio
    return sample_to_files(model, args.out, n=args.n, labels=args.label, seed=args.seed, sampler=args.sampler,
                           steps=args.steps, guidance=args.guidance, precision=args.precision, schedule=args.schedule)


def _sample_audio(model, args) -> dict | None:
    """A model of spectrograms (data=instruments), or --out NAME.wav: write WAVs, the spectrogram grid and an HTML
    page with a player per sample (pipelines/audio.py); None for any other model, which writes images."""
    from .pipelines.audio import sample_audio_to_files, writes_audio

    if not writes_audio(model, args.out):
        return None
    return sample_audio_to_files(model, args.out, n=args.n, labels=args.label, seed=args.seed, sampler=args.sampler,
                                 steps=args.steps, guidance=args.guidance, precision=args.precision,
                                 schedule=getattr(args, "schedule", None))


def _component_kind(args) -> str | None:
    """What the run (or shipped model) to evaluate holds: "diffusion", "vae", "mlp-autoencoder", ..."""
    from importlib import resources
    from pathlib import Path

    from .artifacts import component_kind

    if args.pretrained:
        path = Path(str(resources.files("minidiffusion.assets"))) / f"{args.pretrained}.safetensors"
    else:
        path = Path(args.run_dir or "") / "model.safetensors"
    if not path.is_file():
        return None  # the loaders below say what is missing
    return component_kind(path)


def _cmd_eval(args) -> dict:
    from .device import resolve_device
    from .metrics.evaluate import evaluate_model
    from .metrics.features import load_feature_network
    from .runs import append_metrics

    kind = _component_kind(args)
    if kind in ("superres", "superres-diffusion"):
        return _eval_upscaler(args)
    if kind in ("vae", "mlp-autoencoder"):
        from .pipelines.autoencoder import evaluate_autoencoder

        features = load_feature_network(args.features, allow_unusual=True) if args.features else None
        result = evaluate_autoencoder(args.run_dir or args.pretrained, args.data, n=args.n, feature_net=features,
                                      seed=args.seed, device=resolve_device(args.device))
        result["model"] = args.run_dir or f"pretrained:{args.pretrained}"
        if args.run_dir:
            append_metrics(args.run_dir, {"phase": "eval", **result})
        return result
    from .learner.distributed import gather, init_distributed, launched_by_torchrun, shard_range, world

    split = {}
    if launched_by_torchrun():  # each process samples its share of the n images; they are scored once
        init_distributed()
        split = {"shard": shard_range(args.n), "gather": gather}
    model = _load_model(args)
    features = load_feature_network(args.features) if args.features else None
    result = evaluate_model(model, n=args.n, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                            seed=args.seed, feature_net=features, precision=args.precision, schedule=args.schedule,
                            **split)
    result["model"] = args.run_dir or f"pretrained:{args.pretrained}"
    if split:
        result["world_size"] = world()[2]
    if args.run_dir and (not split or world()[0] == 0):
        append_metrics(args.run_dir, {"phase": "eval", **result})
    return result


def _eval_upscaler(args) -> dict:
    """PSNR/SSIM of an upscaler and of bicubic upscaling on the same held-out crops (pipelines/superres.py)."""
    from .device import resolve_device
    from .pipelines.superres import Upscaler, evaluate_upscaler_on
    from .runs import append_metrics

    device = resolve_device(args.device)
    precision = "fp32" if args.precision == "auto" else args.precision
    model = (Upscaler.from_pretrained(args.pretrained, device, precision) if args.pretrained
             else Upscaler.from_run(args.run_dir, device, precision))
    result = evaluate_upscaler_on(model, args.data or "photos", n=args.n)
    result["model"] = args.run_dir or f"pretrained:{args.pretrained}"
    if args.run_dir:
        append_metrics(args.run_dir, {"phase": "eval", **result})
    return result


def _cmd_upscale(args) -> dict:
    from .device import resolve_device
    from .pipelines.superres import upscale_file

    if args.pretrained and args.run:
        raise MinidiffusionError("give either --pretrained NAME or --run DIR, not both")
    pretrained = None if args.run else (args.pretrained or "photos-sr2")
    precision = "fp32" if args.precision == "auto" else args.precision
    return upscale_file(args.image, args.out, pretrained=pretrained, run=args.run, device=resolve_device(args.device),
                        tile=args.tile, overlap=args.overlap, precision=precision, steps=args.steps, seed=args.seed)


def _cmd_encode(args) -> dict:
    from .device import resolve_device
    from .pipelines.autoencoder import encode_to_folder

    return encode_to_folder(args.vae, args.data, args.out, split=args.split, image_size=args.image_size,
                            device=resolve_device(args.device))


def _text_to_image_pipeline(args):
    """The TextToImage pipeline of RUN, --pretrained NAME or --sd DIR (one of them)."""
    from .device import resolve_device
    from .pipelines.text_to_image import TextToImage

    given = [a for a in (args.run_dir, args.pretrained, args.sd) if a]
    if len(given) != 1:
        raise MinidiffusionError("give one text-to-image model: a run directory, --pretrained NAME or --sd DIR")
    device = resolve_device(args.device)
    if args.sd:
        from .pipelines.sd import StableDiffusion

        return StableDiffusion.from_pretrained(args.sd, device)
    if args.pretrained:
        return TextToImage.from_pretrained(args.pretrained, device)
    if not _is_text_to_image(args):
        raise MinidiffusionError(f"{args.run_dir} is not a text-to-image run (it has no text encoder); train one with "
                                 "`minidiffusion train emoji-t2i`")
    return TextToImage.from_run(args.run_dir, device)


def _cmd_textual_inversion(args) -> dict:
    from .paths import check_writable
    from .recipes.textual_inversion import TextualInversionConfig, concept_images, train_textual_inversion

    cfg = TextualInversionConfig(token=args.token, init_word=args.init_word, vectors=args.vectors, steps=args.steps,
                                 lr=args.lr, seed=args.seed)
    check_writable(args.out)
    pipe = _text_to_image_pipeline(args)
    size = pipe.cfg.image_size * pipe.model.vae.downsample_factor
    return train_textual_inversion(pipe, concept_images(args.images, size), args.out, cfg, progress=not args.quiet)


def _cmd_dreambooth(args) -> dict:
    from importlib import resources
    from pathlib import Path

    from .recipes.dreambooth import DreamBoothConfig, train_dreambooth
    from .recipes.textual_inversion import concept_images

    cfg = DreamBoothConfig(token=args.token, class_word=args.class_word, steps=args.steps, lr=args.lr,
                           prior_weight=args.prior_weight, class_images=args.class_images, seed=args.seed)
    if args.sd:
        raise MinidiffusionError("dreambooth fine-tunes our own text-to-image runs; for a Stable Diffusion folder use "
                                 "textual-inversion (or diffusers' DreamBooth script)")
    pipe = _text_to_image_pipeline(args)
    run = Path(args.run_dir) if args.run_dir else Path(str(resources.files("minidiffusion.assets"))) / args.pretrained
    size = pipe.cfg.image_size * pipe.model.vae.downsample_factor
    return train_dreambooth(pipe, run, concept_images(args.images, size), args.out, cfg, progress=not args.quiet)


def _cmd_data(args) -> dict:
    from .data.fashion_mnist import OFFICIAL_URL, download_fashion_mnist, find_fashion_mnist

    if args.dest is None:
        try:
            found = find_fashion_mnist()
            print(f"Fashion-MNIST is already available at {found}")
            return {"path": str(found), "downloaded": False}
        except MinidiffusionError:
            pass
    path = download_fashion_mnist(args.dest, args.url or OFFICIAL_URL)
    return {"path": str(path), "downloaded": True}


def _cmd_serve(args) -> dict:
    from .serve.server import main as serve

    return serve(args.host, args.port, args.run or (), device=args.device, queue_limit=args.queue)


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory to write (config, metrics, checkpoints, PNGs)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--replace", action="store_true", help="move an existing run in --out aside and start anew")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides: epochs=5 minutes=10 seed=1 lr=3e-3 model.channels=[32,64,128] ...")


def _model_options(p: argparse.ArgumentParser) -> None:
    from .device import PRECISIONS
    from .diffusion.samplers import SAMPLERS
    from .diffusion.schedules import SCHEDULES
    from .pipelines.image import MAX_GUIDANCE, MAX_STEPS

    p.add_argument("run_dir", nargs="?", help="run directory written by `minidiffusion train`")
    p.add_argument("--pretrained", default=None, metavar="NAME", help="a model shipped with the package (fmnist)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="default: the model's")
    p.add_argument("--steps", type=_number(1, MAX_STEPS, integer=True), default=None,
                   help=f"sampling steps, 1..{MAX_STEPS} (default: the model's)")
    p.add_argument("--schedule", default=None, choices=[*SCHEDULES, "auto"],
                   help="sigma spacing (default: the model's own, Karras rho = 7 for EDM); exponential = uniform in "
                   "log sigma; auto = the best for the NFE budget")
    p.add_argument("--seed", type=_number(0, 2**63 - 1, integer=True), default=0, help="same seed, same images")
    p.add_argument("--guidance", type=_number(0.0, MAX_GUIDANCE), default=None,
                   help="classifier-free guidance scale, 0..100 (1 = none; default: the model's)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `minidiffusion` command."""
    from .config import list_presets
    from .metrics.evaluate import MIN_EVAL_SAMPLES
    from .pipelines.image import MAX_SAMPLES

    p = _Parser(prog="minidiffusion", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tr = sub.add_parser("train", help="train any recipe (diffusion model, classifier) from a preset",
                        description="Train the recipe a preset names into a run directory. Shipped presets: "
                                    f"{', '.join(list_presets())}; or give a .toml path. With --resume and no "
                                    "preset, the run's own config.toml is used.")
    tr.add_argument("preset", nargs="?", default=None, help="preset name or .toml path")
    _train_options(tr)
    tr.set_defaults(func=_cmd_train)

    tc = sub.add_parser("train-classifier", help="train the Fashion-MNIST ResNet classifier (alias of "
                        "`train fmnist-classifier`)", description="Train the Fashion-MNIST ResNet classifier "
                        "(preset fmnist-classifier) and report its test accuracy.")
    tc.add_argument("--epochs", type=_number(1, 100_000, integer=True), default=None,
                    help="number of epochs (default: the preset's)")
    tc.add_argument("--preset", default=None,
                    help="preset name or .toml path (default fmnist-classifier; with a bare --resume, the run's own)")
    _train_options(tc)
    tc.set_defaults(func=_cmd_train_classifier)

    sa = sub.add_parser("sample", help="generate images from a trained run or a shipped model",
                        description="Generate images: a PNG grid (one labelled row per class), the denoising "
                                    "progression (-progression.png) and the images in [-1, 1] (.npz).")
    _model_options(sa)
    sa.add_argument("--n", type=_number(1, MAX_SAMPLES, integer=True), default=None,
                    help=f"number of images, 1..{MAX_SAMPLES} (default: 40, or 4 for a prompt)")
    sa.add_argument("--label", action="append", default=None,
                    help="class name or index (repeatable); default: balanced over all classes")
    sa.add_argument("--prompt", default=None, help="text-to-image models: what to draw")
    sa.add_argument("--sd", default=None, metavar="DIR",
                    help="a local diffusers-format Stable Diffusion folder, through our samplers (needs the sd extra)")
    sa.add_argument("--negative-prompt", default=None,
                    help="text-to-image: what to steer away from (replaces the empty prompt in guidance)")
    sa.add_argument("--init-image", default=None, help="text-to-image: start from this image (image-to-image)")
    sa.add_argument("--embedding", action="append", default=None, metavar="EMB",
                    help="text-to-image: a word learned by `minidiffusion textual-inversion` (repeatable)")
    sa.add_argument("--strength", type=_number(0.0, 1.0), default=0.6,
                    help="image-to-image: how much to change it, 0..1 (runs round(steps x strength) of the steps)")
    sa.add_argument("--out", default="samples.png", help="grid PNG to write (plus -progression.png and .npz); "
                    "a sound model (data=instruments) or NAME.wav: NAME-0.wav ..., NAME.png and NAME.html")
    sa.set_defaults(func=_cmd_sample)

    ev = sub.add_parser("eval", help="measure a model: FID/KID of its samples, or an autoencoder's reconstructions",
                        description="A diffusion model: FID and KID of its samples against the held-out images "
                                    "of its data set, in a classifier's feature space, with the reals floor at the "
                                    "same N. An autoencoder: PSNR, SSIM and reconstruction FID/KID of --n held-out "
                                    "images. An upscaler: PSNR and SSIM against bicubic upscaling on the same "
                                    "--n held-out crops.")
    _model_options(ev)
    ev.add_argument("--n", "--samples", dest="n", type=_number(MIN_EVAL_SAMPLES, 60_000, integer=True), default=2048,
                    help=f"number of samples (and of reals for the floor), {MIN_EVAL_SAMPLES}..60000; under torchrun "
                    "write --samples (torchrun takes --n for one of its own options); the processes split them")
    ev.add_argument("--features", default=None,
                    help="feature network: a classifier run dir or .safetensors (default: the shipped one)")
    ev.add_argument("--data", default=None,
                    help="autoencoders: the held-out images to reconstruct (emoji, photos, fashion-mnist; default: "
                         "what it trained on); upscalers: photos (default), sprites or emoji")
    ev.set_defaults(func=_cmd_eval)

    up = sub.add_parser("upscale", help="double the resolution of an image with a trained upscaler (photos-sr2)",
                        description="Upscale IMAGE (PNG/JPEG; RGB, grayscale, with or without alpha) x2 with the "
                                    "shipped photos-sr2 U-Net (default), another shipped upscaler or a `train "
                                    "photos-sr2` run; large images go through in overlapping tiles.")
    up.add_argument("image", help="the image file to upscale")
    up.add_argument("--out", required=True, help="file to write (.png, .jpg or .webp)")
    up.add_argument("--pretrained", default=None, metavar="NAME", help="a shipped upscaler (default photos-sr2)")
    up.add_argument("--run", default=None, metavar="DIR", help="a super-resolution run directory instead")
    up.add_argument("--tile", type=_number(0, 65536, integer=True), default=192,
                    help="tile side in input pixels (0: never tile); larger images are cut into tiles")
    up.add_argument("--overlap", type=_number(0, 65536, integer=True), default=32,
                    help="overlap of neighbouring tiles in input pixels (at least 4, less than --tile)")
    up.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    up.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="the network's precision (auto: fp32)")
    up.add_argument("--steps", type=_number(1, 1000, integer=True), default=None,
                    help="a diffusion upscaler's sampling steps (default: its own)")
    up.add_argument("--seed", type=_number(0, 2**63 - 1, integer=True), default=None,
                    help="a diffusion upscaler's noise seed (default: its own)")
    up.set_defaults(func=_cmd_upscale)

    en = sub.add_parser("encode", help="encode a data set once with a trained autoencoder, for latent diffusion",
                        description="Encode a split of a data set with an autoencoder (a `train emoji-vae` run, "
                                    "a shipped name, or a diffusers AutoencoderKL folder) into a folder of "
                                    "memory-mapped posteriors that `train emoji-latent latents=DIR` reads.")
    en.add_argument("vae", help="autoencoder: run directory, model.safetensors, shipped name, or diffusers folder")
    en.add_argument("--data", default="emoji", help="data set to encode: emoji, photos, fashion-mnist, or a folder")
    en.add_argument("--split", default="both", choices=["both", "train", "test"],
                    help="both (default): OUT/train and OUT/test; train or test: that split into OUT itself")
    en.add_argument("--image-size", type=_number(8, 1024, integer=True), default=64, help="image side, 8..1024")
    en.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    en.add_argument("--out", required=True, help="folder to write (latents.f32, labels.npy, latents.json)")
    en.set_defaults(func=_cmd_encode)

    ti = sub.add_parser("textual-inversion", help="teach a text-to-image model a new word from a few images",
                        description="Textual inversion: learn the embedding vector(s) of a new token from 3-5 images "
                                    "with the frozen model's own loss; every other weight stays as it was. The "
                                    "small file it writes loads with `sample ... --embedding FILE`.")
    ti.add_argument("run_dir", nargs="?", help="a text-to-image run directory")
    ti.add_argument("--pretrained", default=None, metavar="NAME", help="a shipped text-to-image model (emoji)")
    ti.add_argument("--sd", default=None, metavar="DIR", help="a local diffusers Stable Diffusion folder")
    ti.add_argument("--images", required=True, help="folder of the concept's images (3-5 PNG/JPEG)")
    ti.add_argument("--token", required=True, help='the new word, e.g. "<my-cat>"')
    ti.add_argument("--init-word", required=True, help="a word close to the concept, e.g. cat: where the vectors start")
    ti.add_argument("--vectors", type=_number(1, 16, integer=True), default=1, help="vectors for the token, 1..16")
    ti.add_argument("--steps", type=_number(1, 1_000_000, integer=True), default=500, help="optimizer steps")
    ti.add_argument("--lr", type=_number(0.0, 10.0, lo_open=True), default=5e-3, help="learning rate")
    ti.add_argument("--seed", type=_number(0, 2**63 - 1, integer=True), default=0)
    ti.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    ti.add_argument("--quiet", action="store_true", help="no progress bars")
    ti.add_argument("--out", required=True, help="the embedding file to write (NAME.safetensors)")
    ti.set_defaults(func=_cmd_textual_inversion)

    db = sub.add_parser("dreambooth", help="fine-tune a text-to-image model so a rare token means your subject",
                        description="DreamBooth: fine-tune the U-Net on 3-5 images of a subject under 'a TOKEN CLASS', "
                                    "with prior preservation (images the model draws itself for 'a CLASS'); writes "
                                    "a full pipeline folder.")
    db.add_argument("run_dir", nargs="?", help="a text-to-image run directory")
    db.add_argument("--pretrained", default=None, metavar="NAME", help="a shipped text-to-image model (emoji)")
    db.add_argument("--sd", default=None, metavar="DIR", help=argparse.SUPPRESS)
    db.add_argument("--images", required=True, help="folder of the subject's images (3-5 PNG/JPEG)")
    db.add_argument("--token", default="sks", help="the rare token that will mean the subject (default sks)")
    db.add_argument("--class-word", required=True, help="what the subject is, e.g. dog")
    db.add_argument("--steps", type=_number(1, 1_000_000, integer=True), default=300, help="optimizer steps")
    db.add_argument("--lr", type=_number(0.0, 10.0, lo_open=True), default=2e-4, help="learning rate")
    db.add_argument("--prior-weight", type=_number(0.0, 1000.0), default=1.0,
                    help="weight of the prior-preservation loss (0: none)")
    db.add_argument("--class-images", type=_number(0, 100_000, integer=True), default=100,
                    help="class images the model draws first for the prior")
    db.add_argument("--seed", type=_number(0, 2**63 - 1, integer=True), default=0)
    db.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    db.add_argument("--quiet", action="store_true", help="no progress bars")
    db.add_argument("--out", required=True, help="folder to write the fine-tuned pipeline into (new or empty)")
    db.set_defaults(func=_cmd_dreambooth)

    se = sub.add_parser("serve", help="a web page to generate images and watch the denoising (needs the web extra)",
                        description="Serve a page (docs/serve.md) for the shipped models and the run directories "
                                    "named: pick a model, a class or a prompt, the sampler, steps, guidance and "
                                    "seed, and watch the predicted clean image at every step. Listens on "
                                    "127.0.0.1 unless --host says otherwise; Ctrl-C stops it.")
    se.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    se.add_argument("--port", type=_number(0, 65535, integer=True), default=7860, help="port, 0..65535 (0: any free)")
    se.add_argument("--run", action="extend", nargs="+", default=None, metavar="DIR",
                    help="run directories to serve besides the shipped models (repeatable)")
    se.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    se.add_argument("--queue", type=_number(1, 10_000, integer=True), default=16,
                    help="requests running or waiting at once, 1..10000; the next one gets HTTP 429")
    se.set_defaults(func=_cmd_serve)

    d = sub.add_parser("data", help="get a data set (Fashion-MNIST) into the user cache, verified by SHA-256",
                       description="Find Fashion-MNIST, or download it into the user cache (verified by SHA-256).")
    d.add_argument("dataset", choices=["fashion-mnist"])
    d.add_argument("--dest", default=None, help="folder to download into (default: the user cache)")
    d.add_argument("--url", default=None, help="mirror to download from (default: the official one)")
    d.set_defaults(func=_cmd_data)
    return p


def _error(message: str) -> int:
    print(f"minidiffusion: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); return the exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # key=value overrides may come after options too (argparse stops its positional list at an option)
        stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
        if stray:
            words = [e for e in stray if not e.startswith("-")]
            if words and hasattr(args, "overrides"):
                raise UsageError(f"{words[0]!r} is neither an option nor a key=value override (e.g. epochs=5); "
                                 f"see `minidiffusion {args.command} --help`")
            raise UsageError(f"unrecognized arguments: {' '.join(stray)} (see `minidiffusion {args.command} --help`)")
    except UsageError as e:
        return _error(str(e))
    except SystemExit as e:  # --help (0) or an argparse exit we did not route through error()
        return e.code if isinstance(e.code, int) else 2
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        result = args.func(args)
    except MinidiffusionError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        print("minidiffusion: interrupted; the last checkpoint (if any) is intact, continue with --resume",
              file=sys.stderr)
        return 130
    sys.stdout.flush()
    if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun, rank 0 alone prints the summary
        print(json.dumps(result), flush=True)  # the summary: the last line on stdout, for scripts
    return 0


if __name__ == "__main__":
    sys.exit(main())
