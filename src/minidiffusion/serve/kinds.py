"""What each family of model takes and makes on the web page: the server's extension point.

A `Kind` turns a request's settings (a JSON object) into checked, fully resolved settings (the
command line's ranges, the model's defaults filled in), runs the model with a per-step report, and
encodes what it made. The server (server.py) knows nothing of labels or prompts: it finds a
model's kind with `kind_of`, shows the page the kind's `describe()` (which inputs to offer, the
classes, the defaults), and streams what `run` reports. Two kinds exist:

- `ImageKind`: a `DiffusionModel` (pixels or latents), class-conditional or not: inputs `label`
  and `schedule` (the sigma spacing, as `sample --schedule`; not offered for a model that samples
  on its own grid).
- `AudioKind`: an `ImageKind` for a model trained on a sound set's spectrograms: the same inputs,
  previews of the spectrograms, and the final items as WAV data URLs (Griffin-Lim, exactly the
  files `minidiffusion sample ... --out NAME.wav` writes), which the page plays with `<audio>`.
- `TextToImageKind`: a `TextToImage` pipeline: `prompt`, `negative_prompt`, an init image and
  `strength` (image-to-image).
- `UpscaleKind`: an `Upscaler` (super-resolution): an uploaded image, upscaled as `minidiffusion
  upscale` does; a diffusion upscaler also takes steps and a seed and previews its denoising.

Another family is one more subclass placed before the kind it refines in `KINDS` (as `AudioKind`
before `ImageKind`): its `handles` picks its models, its `describe()` names its inputs and its
`media`, its `encode`/`run` return data URLs of that media (previews stay images), and the page
renders items by their media type; the queue, the stream and the validation of the shared
settings stay as they are.

Every setting is checked where it enters, with the sentences of the command line
(`check_sampling`, `check_number`): a bad value raises `ConfigError`, which the server answers
with HTTP 400 and that sentence.
"""

from __future__ import annotations

import base64
import io
import math
import secrets
import shlex
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import check_choice, check_number
from ..data.images import save_grid, to_pil
from ..device import PRECISIONS, resolve_precision
from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedules import SCHEDULES
from ..errors import ConfigError
from ..pipelines.image import MAX_GUIDANCE, MAX_STEPS, DiffusionModel, check_sampling
from ..pipelines.outputs import save_npz, save_samples
from ..pipelines.text_to_image import STOCHASTIC, TextToImage, strength_start

__all__ = ["Limits", "Kind", "ImageKind", "AudioKind", "TextToImageKind", "UpscaleKind", "CONTROLS",
           "KINDS", "kind_of", "Outputs", "Report",
           "data_url", "png_data_url", "MAX_SEED", "preview_steps"]

MAX_SEED = 2**63 - 1
CONTROLS = ("guidance", "steps", "sampler", "seed", "n", "preview_every", "precision")  # the page's shared fields
MAX_UPSCALE_SIDE = 512  # the largest image side the page upscales (one pass, no tiles: previews show it whole)
RANDOM_SEED_BITS = 53  # a seed the server draws stays exact in JavaScript's numbers (2**53)
# Report(step index i, steps this run makes, sigma, index of the first image, thunk -> images [k, C, H, W] in [-1, 1])
Report = Callable[[int, int, float, int, Callable[[], torch.Tensor]], None]


@dataclass(frozen=True)
class Limits:
    """The bounds a request must keep: images per request, prompt length, upload bytes and pixels."""

    max_images: int = 16  # images per request (the command line allows 100,000: a page shows a few)
    max_prompt: int = 1000  # characters of a prompt or negative prompt
    max_upload_bytes: int = 20 * 2**20  # an init image file
    max_pixels: int = 16_000_000  # an init image's width x height (a decompression bomb is refused unread)
    max_preview_every: int = MAX_STEPS

    def describe(self) -> dict:
        """Return the limits as the page reads them (seeds as strings: 2**63 - 1 is not exact in JavaScript)."""
        return {"steps": [1, MAX_STEPS], "guidance": [0.0, MAX_GUIDANCE], "n": [1, self.max_images],
                "seed": ["0", str(MAX_SEED)], "strength": [0.0, 1.0], "prompt_chars": self.max_prompt,
                "upload_bytes": self.max_upload_bytes, "upload_pixels": self.max_pixels,
                "preview_every": [1, self.max_preview_every]}


@dataclass
class Outputs:
    """What one request made: `items` (one data URL each, of `media`), a caption per item, and the files to
    download ({file name: (MIME type, bytes)})."""

    media: str
    items: list[str]
    captions: list[str]
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)


def data_url(mime: str, data: bytes) -> str:
    """Return `data` (a file's bytes of type `mime`) as a base64 data URL."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def png_data_url(image: torch.Tensor, compress_level: int = 6) -> str:
    """Return one [C, H, W] image in [-1, 1] as a PNG data URL (8-bit: exactly `float_to_uint8` of it)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG", compress_level=compress_level)
    return data_url("image/png", buf.getvalue())


def preview_steps(steps: int, every: int) -> list[int]:
    """Return the step indices (0-based) a run of `steps` steps previews: every `every`-th, and always the last."""
    return [i for i in range(steps) if i % every == 0 or i == steps - 1]


def _file_bytes(write: Callable[[Path], Any], name: str) -> bytes:
    """Return the bytes `write(path)` puts in a temporary file called `name` (the pipelines' writers take paths)."""
    with tempfile.TemporaryDirectory(prefix="minidiffusion-serve-") as d:
        path = Path(d) / name
        write(path)
        return path.read_bytes()


def _seed(value: Any) -> int:
    """Return a seed: an integer in 0..2**63-1, its decimal digits as a string, or None for a random one."""
    if value is None or value == "":
        return secrets.randbits(RANDOM_SEED_BITS)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in 0..{MAX_SEED} (or null for a random one), got {value!r}")
    return value


def _text(name: str, value: Any, limit: int, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string of at most {limit} characters, got {value!r:.60}")
    if len(value) > limit:
        raise ConfigError(f"{name} must be at most {limit} characters, got {len(value)}")
    return value


class Kind:
    """A family of models the page serves: what it takes (`describe`, `settings`), runs (`run`) and makes."""

    name: ClassVar[str]
    media: ClassVar[str] = "image"
    inputs: ClassVar[tuple[str, ...]] = ()  # the controls the page shows besides the shared ones
    default_n: ClassVar[int] = 4  # images when a request names no n
    keys: ClassVar[frozenset[str]] = frozenset()  # the settings this kind reads besides COMMON_KEYS
    COMMON_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"model", "kind", "n", "sampler", "steps", "guidance", "seed", "precision", "preview_every"})

    @staticmethod
    def handles(model: Any) -> bool:
        """Return True if `model` is of this kind."""
        raise NotImplementedError

    def diffusion_model(self, model: Any) -> DiffusionModel:
        """Return the DiffusionModel inside `model` (its sampling defaults and device)."""
        return model

    def describe(self, model: Any) -> dict:
        """Return what the page needs to offer this model: kind, media, inputs, the shared controls it takes,
        defaults (a JSON object)."""
        dm = self.diffusion_model(model)
        return {"kind": self.name, "media": self.media, "inputs": list(self.inputs), "controls": list(CONTROLS),
                "defaults": {"sampler": dm.cfg.sampler, "steps": dm.cfg.steps, "guidance": dm.cfg.guidance,
                             "precision": "auto", "n": self.default_n},
                "image_size": self.init_size(model), "device": str(dm.device)}

    def init_size(self, model: Any) -> int | None:
        """Return the side an uploaded image is fitted to (the model's image size), or None to keep its own size."""
        dm = self.diffusion_model(model)
        return dm.cfg.image_size * (dm.vae.downsample_factor if dm.vae is not None else 1)

    def check_upload(self, model: Any, image: Any, limits: Limits) -> None:
        """Raise ConfigError/DataError for an uploaded image (as `read_init_image` returned it) this kind refuses."""

    def settings(self, model: Any, body: Mapping[str, Any], limits: Limits, has_image: bool) -> dict:
        """Return the request's settings checked and resolved (defaults filled in, a random seed drawn), in the
        order the page shows them; raise ConfigError with the command line's sentence for a bad one."""
        unknown = sorted(set(body) - self.COMMON_KEYS - self.keys)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} for {self.name} models; the settings are "
                              f"{', '.join(sorted(self.COMMON_KEYS | self.keys))}")
        if body.get("kind", self.name) != self.name:
            raise ConfigError(f"these settings are for a {body['kind']!r} model; this one is a {self.name} model")
        dm = self.diffusion_model(model)
        for key, choices in (("sampler", SAMPLERS), ("precision", PRECISIONS)):
            if body.get(key) is not None and not isinstance(body[key], str):  # not hashable, or not a name
                check_choice(key, repr(body[key]), choices)
        sampler, steps, guidance = dm.settings(body.get("sampler"), body.get("steps"), body.get("guidance"))
        n = body.get("n")  # null, as every setting but the model: the default
        n = check_number("n", self.default_n if n is None else n, lo=1, hi=limits.max_images, integer=True)
        check_sampling(n=n)
        precision = check_choice("precision", body.get("precision") or "auto", PRECISIONS)
        every = body.get("preview_every")
        if every is not None:
            check_number("preview_every", every, lo=1, hi=limits.max_preview_every, integer=True)
        return {"sampler": sampler, "steps": steps, "guidance": float(guidance), "n": n,
                "seed": _seed(body.get("seed")), "precision": resolve_precision(precision, dm.device),
                "preview_every": every}

    def steps_run(self, settings: Mapping[str, Any]) -> int:
        """Return how many sampler steps a run with these settings makes (its callback's calls per image)."""
        return settings["steps"]

    def runs_per_image(self, settings: Mapping[str, Any]) -> bool:
        """Return True if each image runs through the sampler on its own (previews come per image)."""
        return False

    def captions(self, model: Any, settings: Mapping[str, Any]) -> list[str]:
        """Return a caption for each item the settings make (known before sampling: the page shows it on previews)."""
        return ["" for _ in range(settings["n"])]

    def run(self, model: Any, settings: Mapping[str, Any], init: torch.Tensor | None, report: Report) -> Outputs:
        """Make the images of `settings`, calling `report` after every sampler step; return the outputs."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor, compress_level: int = 6) -> list[str]:
        """Return each final item of a batch as a data URL of this kind's `media`."""
        return [png_data_url(x, compress_level) for x in images]

    def encode_preview(self, images: torch.Tensor) -> list[str]:
        """Return each step's predictions [k, C, H, W] in [-1, 1] as PNG data URLs (fast: least compression). Previews
        stay images whatever the media (a sound model's are its spectrograms)."""
        return [png_data_url(x, compress_level=1) for x in images]

    def command_line(self, source: str | None, settings: Mapping[str, Any]) -> str | None:
        """Return the `minidiffusion sample` command that makes the same images, or None without a source."""
        return None


def _auto_every(steps: int) -> int:
    return max(1, math.ceil(steps / 50))  # about 50 previews at most unless asked for more


class ImageKind(Kind):
    """A DiffusionModel: noise -> images, conditioned on a class label (or on nothing)."""

    name = "image"
    inputs = ("label", "schedule")
    keys = frozenset({"label", "schedule"})
    out_name = "samples.png"  # what the command line's --out names

    @staticmethod
    def handles(model: Any) -> bool:
        """Return True for a DiffusionModel (pixels or latents)."""
        return isinstance(model, DiffusionModel)

    @staticmethod
    def schedules(model: DiffusionModel) -> list[str]:
        """Return the sigma schedules a request may name for this model ([] when it samples on its own grid)."""
        return [] if getattr(model.objective, "samplers", None) is not None else [*SCHEDULES, "auto"]

    def describe(self, model: DiffusionModel) -> dict:
        """Return the base description with `classes` (names, or indices as strings), `schedules`, and as inputs
        `label` when the model is class-conditional and `schedule` when it takes one."""
        k = model.cfg.model.n_classes
        names = model.class_names if len(model.class_names) == k else [str(i) for i in range(k)]
        schedules = self.schedules(model)
        inputs = (["label"] if k else []) + (["schedule"] if schedules else [])
        return {**super().describe(model), "inputs": inputs, "classes": names, "schedules": schedules}

    def settings(self, model: DiffusionModel, body: Mapping[str, Any], limits: Limits, has_image: bool) -> dict:
        """Return the shared settings plus `label` (the class name the command line matches, an index for a
        model without names, or None: balanced); raise ConfigError for an init image or a bad label."""
        if has_image:
            raise ConfigError("image-to-image needs a text-to-image model; this one makes images from a class label")
        out = super().settings(model, body, limits, has_image)
        label = body.get("label")
        k = model.cfg.model.n_classes
        if label is not None and label != "":
            if not k:
                raise ConfigError("this model is unconditional: send no label")
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise ConfigError(f"label must be a class name or an index 0..{k - 1}, got {label!r:.60}")
            if isinstance(label, str):
                _text("label", label, limits.max_prompt)
            idx = int(model.label_ids([label], 1)[0])  # the command line's matching and sentences
            label = model.class_names[idx] if len(model.class_names) == k else idx
        else:
            label = None
        schedule = body.get("schedule")
        if schedule is not None and schedule != "":
            if not isinstance(schedule, str):
                check_choice("schedule", repr(schedule), (*SCHEDULES, "auto"))
            model.sigmas(out["steps"], out["sampler"], schedule)  # the command line's choices and sentences
        else:
            schedule = None
        every = out["preview_every"] or _auto_every(out["steps"])
        return {"label": label, **out, "preview_every": every, "schedule": schedule}

    def captions(self, model: DiffusionModel, settings: Mapping[str, Any]) -> list[str]:
        """Return each image's class name (balanced over the classes when no label is given), or empty strings."""
        ids = model.label_ids(None if settings["label"] is None else [settings["label"]], settings["n"])
        if ids is None:
            return super().captions(model, settings)
        names = self.describe(model)["classes"]
        return [names[int(i)] for i in ids]

    def sample(self, model: DiffusionModel, settings: Mapping[str, Any], report: Report
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (images [n, C, H, W] in [-1, 1], class ids or None) as `minidiffusion sample` makes them,
        reporting the predicted clean images after each step."""
        steps = settings["steps"]

        def callback(info):
            report(info["i"], steps, info["sigma"], 0, lambda: model.to_images(info["denoised"]))

        labels = None if settings["label"] is None else [settings["label"]]
        return model.sample(settings["n"], sampler=settings["sampler"], steps=steps, labels=labels,
                            guidance=settings["guidance"], seed=settings["seed"], callback=callback,
                            precision=settings["precision"], schedule=settings.get("schedule"))

    def run(self, model: DiffusionModel, settings: Mapping[str, Any], init: torch.Tensor | None,
            report: Report) -> Outputs:
        """Sample as `minidiffusion sample` does, reporting the predicted clean images after each step; return
        the images, their captions, the grid PNG and the .npz."""
        x, ids = self.sample(model, settings, report)
        labels = None if settings["label"] is None else [settings["label"]]
        captions = self.captions(model, settings)
        k = model.cfg.model.n_classes
        grid = _file_bytes(lambda p: save_samples(x, ids, model.class_names, k, p, balanced=labels is None),
                           "grid.png")
        npz = _file_bytes(lambda p: save_npz(p, x, ids), "samples.npz")
        return Outputs(self.media, self.encode(x), captions,
                       {"grid.png": ("image/png", grid), "samples.npz": ("application/octet-stream", npz)})

    def command_line(self, source: str | None, s: Mapping[str, Any]) -> str | None:
        """Return the `minidiffusion sample` command (one shell-quoted string) that writes the same files, or None."""
        if source is None:
            return None
        label = [] if s["label"] is None else ["--label", str(s["label"])]
        schedule = [] if s.get("schedule") is None else ["--schedule", s["schedule"]]
        args = ["minidiffusion", "sample", *shlex.split(source), *label, "--n", str(s["n"]), "--sampler",
                s["sampler"], "--steps", str(s["steps"]), *schedule, "--guidance", repr(s["guidance"]), "--seed",
                str(s["seed"]), "--precision", s["precision"], "--out", self.out_name]
        return shlex.join(args)


class AudioKind(ImageKind):
    """A DiffusionModel of a sound set's spectrograms: previews of the spectrograms, then sounds to play."""

    name = "audio"
    media = "audio"
    out_name = "samples.wav"

    @staticmethod
    def handles(model: Any) -> bool:
        """Return True for a DiffusionModel trained on a sound set (its config's `data` is one)."""
        from ..pipelines.audio import writes_audio

        return isinstance(model, DiffusionModel) and writes_audio(model, "samples.png")

    def run(self, model: DiffusionModel, settings: Mapping[str, Any], init: torch.Tensor | None,
            report: Report) -> Outputs:
        """Sample the spectrograms as `minidiffusion sample ... --out samples.wav` does and turn them into the
        same WAVs (Griffin-Lim seeded by the request's seed); return them as WAV data URLs with the spectrogram
        grid, the .npz of the spectrograms and each WAV as files."""
        from ..pipelines.audio import write_audio_samples

        x, ids = self.sample(model, settings, report)
        files = {}
        with tempfile.TemporaryDirectory(prefix="minidiffusion-serve-") as d:
            written = write_audio_samples(x, ids, Path(d) / "samples", model.class_names, seed=settings["seed"])
            wavs = [Path(p).read_bytes() for p in written["wavs"]]
            files["grid.png"] = ("image/png", Path(written["grid"]).read_bytes())
        files["samples.npz"] = ("application/octet-stream", _file_bytes(lambda p: save_npz(p, x, ids),
                                                                          "samples.npz"))
        for k, wav in enumerate(wavs):
            files[f"samples-{k}.wav"] = ("audio/wav", wav)
        items = [data_url("audio/wav", w) for w in wavs]
        return Outputs(self.media, items, self.captions(model, settings), files)


class TextToImageKind(Kind):
    """A TextToImage pipeline: a prompt (and a negative one) -> images, or image-to-image with a strength."""

    name = "text-to-image"
    inputs = ("prompt", "negative_prompt", "init_image", "strength")
    default_n = 1
    keys = frozenset({"prompt", "negative_prompt", "strength", "init_image_sha256"})

    @staticmethod
    def handles(model: Any) -> bool:
        """Return True for a TextToImage pipeline."""
        return isinstance(model, TextToImage)

    def diffusion_model(self, model: TextToImage) -> DiffusionModel:
        """Return the pipeline's DiffusionModel (its U-Net, VAE and sampling defaults)."""
        return model.model

    def describe(self, model: TextToImage) -> dict:
        """Return the base description with no classes and a default strength of 0.6."""
        out = super().describe(model)
        return {**out, "classes": [], "defaults": {**out["defaults"], "strength": 0.6}}

    def settings(self, model: TextToImage, body: Mapping[str, Any], limits: Limits, has_image: bool) -> dict:
        """Return the shared settings plus `prompt`, `negative_prompt` and `strength` (None without an init
        image); raise ConfigError for a missing or over-long prompt, a label, or a bad strength."""
        if "label" in body:
            raise ConfigError("a text-to-image model takes a prompt, not a label")
        if "prompt" not in body:
            raise ConfigError("this is a text-to-image model: give a prompt (and optionally a negative prompt, an "
                              "init image with a strength)")
        prompt = _text("prompt", body["prompt"], limits.max_prompt, required=True)
        negative = _text("negative_prompt", body.get("negative_prompt"), limits.max_prompt)
        out = super().settings(model, body, limits, has_image)
        strength = body.get("strength")
        strength = 0.6 if strength is None else check_number("strength", strength, lo=0.0, hi=1.0)
        sha = body.get("init_image_sha256")
        if sha is not None and not has_image:
            raise ConfigError(f"these settings were made from an init image (sha256 {str(sha)[:64]}); upload it again")
        s = {"prompt": prompt, "negative_prompt": negative, **out,
             "strength": float(strength) if has_image else None}
        s["preview_every"] = out["preview_every"] or _auto_every(self.steps_run(s))
        return s

    def captions(self, pipe: TextToImage, settings: Mapping[str, Any]) -> list[str]:
        """Return each image's own seed as its caption (image k uses seed + k)."""
        return [f"seed {settings['seed'] + k}" for k in range(settings["n"])]  # image k's own seed

    def steps_run(self, settings: Mapping[str, Any]) -> int:
        """Return the steps the sampler runs: all of them, or the last part for image-to-image."""
        if settings.get("strength") is None:
            return settings["steps"]
        return settings["steps"] - strength_start(settings["steps"], settings["strength"])

    def runs_per_image(self, settings: Mapping[str, Any]) -> bool:
        """Return True for a stochastic sampler: the pipeline runs each image on its own seed, one by one."""
        return settings["sampler"] in STOCHASTIC

    def run(self, pipe: TextToImage, settings: Mapping[str, Any], init: torch.Tensor | None,
            report: Report) -> Outputs:
        """Run the pipeline, reporting the predicted clean images after each step; return the images, their
        captions, the grid PNG and the .npz."""
        steps = self.steps_run(settings)

        def callback(info):
            first = info["image"] or 0
            report(info["i"], steps, info["sigma"], first, lambda: pipe.model.to_images(info["denoised"]))

        x = pipe(settings["prompt"], n=settings["n"], negative_prompt=settings["negative_prompt"],
                 guidance=settings["guidance"], steps=settings["steps"], sampler=settings["sampler"],
                 seed=settings["seed"], init_image=init,
                 strength=settings["strength"] if settings["strength"] is not None else 0.6,
                 callback=callback, precision=settings["precision"])
        grid = _file_bytes(lambda p: save_grid(x, p, scale=2), "grid.png")
        npz = _file_bytes(lambda p: save_npz(p, x, None), "samples.npz")
        return Outputs(self.media, self.encode(x), self.captions(pipe, settings),
                       {"grid.png": ("image/png", grid), "samples.npz": ("application/octet-stream", npz)})

    def command_line(self, source: str | None, s: Mapping[str, Any]) -> str | None:
        """Return the `minidiffusion sample --prompt` command (one shell-quoted string) for these settings, or
        None; an init image appears as init.png."""
        if source is None:
            return None
        args = ["minidiffusion", "sample", *shlex.split(source), "--prompt", s["prompt"]]
        if s["negative_prompt"] is not None:
            args += ["--negative-prompt", s["negative_prompt"]]
        if s["strength"] is not None:
            args += ["--init-image", "init.png", "--strength", repr(s["strength"])]
        args += ["--n", str(s["n"]), "--sampler", s["sampler"], "--steps", str(s["steps"]), "--guidance",
                 repr(s["guidance"]), "--seed", str(s["seed"]), "--precision", s["precision"], "--out", "samples.png"]
        return shlex.join(args)


class UpscaleKind(Kind):
    """An `Upscaler` (pipelines/superres.py): an uploaded image -> the same image `scale` times larger. A diffusion
    upscaler samples (controls: steps, seed, preview every) and previews bicubic + the residual denoised so far;
    a regression one is one forward pass (no previews). Images up to MAX_UPSCALE_SIDE pixels a side, untiled:
    exactly `minidiffusion upscale FILE --tile 0`."""

    name = "upscale"
    inputs = ("init_image",)
    default_n = 1
    keys = frozenset({"init_image_sha256"})

    @staticmethod
    def handles(model: Any) -> bool:
        """Return True for an Upscaler."""
        from ..pipelines.superres import Upscaler

        return isinstance(model, Upscaler)

    @staticmethod
    def controls(model: Any) -> list[str]:
        """Return the shared controls this upscaler takes."""
        return ["steps", "seed", "preview_every"] if model.diffusion else []

    def describe(self, model: Any) -> dict:
        """Return kind, media, inputs (the image), controls, defaults, scale, whether it samples, the size limit."""
        defaults = {"n": 1, "precision": "fp32", **({"steps": model.cfg.steps, "sampler": model.cfg.sampler}
                                                     if model.diffusion else {})}
        return {"kind": self.name, "media": self.media, "inputs": list(self.inputs), "controls": self.controls(model),
                "defaults": defaults, "classes": [], "schedules": [], "image_size": None, "scale": model.scale,
                "diffusion": model.diffusion, "max_side": MAX_UPSCALE_SIDE, "device": str(model.device)}

    def init_size(self, model: Any) -> int | None:
        """Return None: the upload is upscaled at its own size."""
        return None

    def check_upload(self, model: Any, image: Any, limits: Limits) -> None:
        """Refuse an image with a side over MAX_UPSCALE_SIDE (the page does not tile)."""
        w, h = image.size
        if max(w, h) > MAX_UPSCALE_SIDE:
            raise ConfigError(f"the page upscales images up to {MAX_UPSCALE_SIDE}x{MAX_UPSCALE_SIDE} pixels, this one "
                              f"is {w}x{h}; use `minidiffusion upscale FILE --out OUT` for larger ones (it tiles)")

    def settings(self, model: Any, body: Mapping[str, Any], limits: Limits, has_image: bool) -> dict:
        """Return {steps, seed, preview_every} for a diffusion upscaler ({} else) plus n = 1 and precision fp32;
        raise ConfigError without an image, or for a setting this upscaler does not take."""
        allowed = {"model", "kind", "init_image_sha256", *self.controls(model)}
        for key in sorted(set(body) - allowed):
            if body[key] is None or (key, body[key]) in (("n", 1), ("precision", "auto"), ("precision", "fp32")):
                continue  # what the page's defaults say anyway
            raise ConfigError(f"an upscaler takes no {key} setting; its settings are {', '.join(sorted(allowed))}")
        if body.get("kind", self.name) != self.name:
            raise ConfigError(f"these settings are for a {body['kind']!r} model; this one is an upscaler")
        if not has_image:
            raise ConfigError("an upscaler needs an image: upload one (init_image), it comes back "
                              f"{model.scale} times larger")
        out: dict = {}
        if model.diffusion:
            steps = body.get("steps")
            steps = model.cfg.steps if steps is None else check_number("steps", steps, lo=1, hi=MAX_STEPS,
                                                                         integer=True)
            every = body.get("preview_every")
            if every is not None:
                check_number("preview_every", every, lo=1, hi=limits.max_preview_every, integer=True)
            out = {"steps": steps, "seed": _seed(body.get("seed")), "preview_every": every or _auto_every(steps)}
        return {**out, "n": 1, "precision": "fp32", **({} if model.diffusion else {"preview_every": 1})}

    def steps_run(self, settings: Mapping[str, Any]) -> int:
        """Return the sampling steps (0 for a regression upscaler: it makes no previews)."""
        return settings.get("steps", 0)

    def captions(self, model: Any, settings: Mapping[str, Any]) -> list[str]:
        """Return one caption: what the upscaler does."""
        return [f"x{model.scale}"]

    def run(self, model: Any, settings: Mapping[str, Any], init: Any, report: Report) -> Outputs:
        """Upscale the uploaded image as `minidiffusion upscale FILE --tile 0` does (the same PNG bytes), reporting
        bicubic + the denoised residual after each step of a diffusion upscaler; return it."""
        from ..pipelines.superres import upscale

        steps = settings.get("steps")

        def callback(info):
            report(info["i"], steps, info["sigma"], 0, lambda: info["image"])

        sampling = {"steps": steps, "seed": settings["seed"], "callback": callback} if model.diffusion else {}
        big = upscale(init, model, tile=0, **sampling)
        buf = io.BytesIO()
        big.save(buf, format="PNG")
        data = buf.getvalue()
        caption = f"{init.size[0]}x{init.size[1]} -> {big.size[0]}x{big.size[1]}"
        return Outputs(self.media, [data_url("image/png", data)], [caption],
                       {"upscaled.png": ("image/png", data)})

    def command_line(self, source: str | None, s: Mapping[str, Any]) -> str | None:
        """Return the `minidiffusion upscale` command that writes the same PNG from the same image (init.png)."""
        if source is None:
            return None
        args = ["minidiffusion", "upscale", "init.png", "--out", "upscaled.png", *shlex.split(source), "--tile", "0"]
        if "steps" in s:
            args += ["--steps", str(s["steps"]), "--seed", str(s["seed"])]
        return shlex.join(args)


# the first whose `handles` says yes serves a model
KINDS: tuple[Kind, ...] = (TextToImageKind(), UpscaleKind(), AudioKind(), ImageKind())


def kind_of(model: Any) -> Kind:
    """Return the kind that serves `model`; raise ConfigError for a model no kind serves."""
    for kind in KINDS:
        if kind.handles(model):
            return kind
    raise ConfigError(f"the web page cannot serve a {type(model).__name__}; it serves "
                      f"{', '.join(k.name for k in KINDS)} models")
