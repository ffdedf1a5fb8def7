"""The web server without a browser: the stream, the settings round trip, bit-exact images, bad input, the queue.

A real uvicorn serves the app on a free loopback port in a thread and httpx talks to it, so streaming,
concurrency and disconnects are the real thing. The models are the shipped `fmnist` (for the images
`minidiffusion sample` makes), a tiny untrained class-conditional U-Net (fast), and a tiny untrained
text-to-image pipeline saved as a run directory (found as one by its text_encoder.toml).
"""

from __future__ import annotations

import io
import json
import shlex
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from minidiffusion.config import apply_overrides
from minidiffusion.data.images import float_to_uint8
from minidiffusion.diffusion.samplers import SAMPLERS
from minidiffusion.errors import ConfigError
from minidiffusion.nn.unet import UNet
from minidiffusion.pipelines.image import DiffusionModel, DiffusionModelConfig
from minidiffusion.pipelines.outputs import load_image
from minidiffusion.pipelines.text_to_image import TextToImage
from minidiffusion.serve.kinds import preview_steps
from minidiffusion.serve.server import BackgroundServer, build_app, main, model_sources

SHIPPED = list(model_sources())  # the shipped models, found as the server finds them (fmnist, and more as they land)
TINY = ["model.channels=[8, 16]", "model.blocks=[1, 1]", "model.attention=[false, false]", "model.norm_groups=4",
        "model.n_classes=3", "steps=4"]


def tiny_model(net_wrapper=None) -> DiffusionModel:
    """A small untrained class-conditional model ("a", "b", "c"): milliseconds a step."""
    cfg = apply_overrides(DiffusionModelConfig(), TINY)
    torch.manual_seed(0)
    net = UNet(cfg.model)
    torch.nn.init.normal_(net.out_conv.weight, std=0.5)  # untrained, but not the zero-output init
    return DiffusionModel(net_wrapper(net) if net_wrapper else net, cfg, ["a", "b", "c"])


class Slow(torch.nn.Module):
    """A network that waits for `gate` (if given) and then `delay` seconds before each call: a job that lasts."""

    def __init__(self, net, gate: threading.Event | None = None, delay: float = 0.0):
        super().__init__()
        self.net, self.gate, self.delay = net, gate, delay

    def forward(self, *args, **kwargs):
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        time.sleep(self.delay)
        return self.net(*args, **kwargs)


def events(response: httpx.Response):
    """Yield (event, data) from a text/event-stream response as it arrives."""
    event, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def generate(url: str, settings: dict, image: bytes | None = None, timeout: float = 120) -> tuple[int, list, dict]:
    """POST settings (and an init image) and read the whole stream: (status, [(event, data)], JSON of a refusal)."""
    kw = ({"data": {"settings": json.dumps(settings)}, "files": {"init_image": ("init.png", image, "image/png")}}
          if image is not None else {"json": settings})
    with httpx.Client(timeout=timeout) as client, client.stream("POST", url + "/api/generate", **kw) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [], r.json()
        return 200, list(events(r)), {}


def done_of(evs: list) -> dict:
    assert evs[-1][0] == "done", evs[-1]
    return evs[-1][1]


def decode_url(url: str) -> bytes:
    import base64

    return base64.b64decode(url.split(",", 1)[1])


def npz_images(done: dict) -> np.ndarray:
    with np.load(io.BytesIO(decode_url(done["files"]["samples.npz"]))) as f:
        return f["images"]


def png(width: int, height: int, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_t2i_run(folder):
    """Write the tiny untrained text-to-image pipeline of test_text_to_image as a run directory; return its pipe."""
    import test_text_to_image as t
    from minidiffusion.artifacts import save_component
    from minidiffusion.paths import float32_state
    from minidiffusion.pipelines.image import save_model
    from minidiffusion.pipelines.text import save_text_encoder

    pipe = t.pipe.__wrapped__()
    save_model(pipe.model.net, pipe.cfg, None, folder / "model.safetensors")
    save_component(folder / "vae.safetensors", float32_state(pipe.model.vae), pipe.model.vae.cfg, "vae")
    save_text_encoder(pipe.text_encoder, folder)
    return pipe


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve") / "tiny-t2i"
    save_t2i_run(run)
    return run


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    """A tiny untrained diffusion upscaler saved as a run directory (found as one by its model's kind)."""
    import test_superres
    from minidiffusion.pipelines.superres import save_upscaler

    run = tmp_path_factory.mktemp("serve") / "tiny-sr"
    cfg, net = test_superres._tiny_diffusion_sr()
    save_upscaler(net, cfg, run / "model.safetensors")
    return run


@pytest.fixture(scope="module")
def url(t2i_run, sr_run):
    models = {**model_sources([t2i_run, sr_run]), "tiny": lambda: tiny_model()}
    with BackgroundServer(build_app(models)) as u:
        yield u


def test_models_lists_each_kind_with_its_inputs_classes_and_defaults(url):
    cat = httpx.get(url + "/api/models").json()
    models = {m["name"]: m for m in cat["models"]}
    assert list(models) == [*SHIPPED, "tiny-t2i", "tiny-sr", "tiny"] and SHIPPED[0] == "fmnist"
    up = models["photos-sr2"]
    assert up["kind"] == "upscale" and up["inputs"] == ["init_image"] and up["controls"] == [] and up["scale"] == 2
    tiny_sr = models["tiny-sr"]
    assert tiny_sr["diffusion"] and tiny_sr["controls"] == ["steps", "seed", "preview_every"]
    assert tiny_sr["source"].startswith("--run ")
    fm = models["fmnist"]
    assert fm["kind"] == "image" and fm["inputs"] == ["label", "schedule"] and fm["media"] == "image"
    assert fm["schedules"] == ["karras", "exponential", "cosine", "auto"]
    fast = models["fmnist-fast"]  # a distilled model samples on its own grid: no schedule to choose
    assert fast["inputs"] == ["label"] and fast["schedules"] == []
    sound = models["instruments"]
    assert sound["kind"] == "audio" and sound["media"] == "audio" and "piano" in sound["classes"]
    assert fm["classes"][7] == "Sneaker" and len(fm["classes"]) == 10 and fm["source"] == "--pretrained fmnist"
    assert fm["defaults"]["steps"] == 20 and fm["image_size"] == 32
    t2i = models["tiny-t2i"]
    assert t2i["kind"] == "text-to-image" and t2i["image_size"] == 16
    assert t2i["inputs"] == ["prompt", "negative_prompt", "init_image", "strength"]
    assert cat["samplers"] == list(SAMPLERS)
    limits = cat["limits"]
    assert limits["steps"] == [1, 1000] and limits["n"] == [1, 16] and limits["prompt_chars"] == 1000
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from another site
    for name in ("app.js", "style.css", "favicon.svg"):
        r = httpx.get(f"{url}/static/{name}")
        assert r.status_code == 200 and "https://" not in r.text and "@import" not in r.text
    assert httpx.get(url + "/static/..%2Fserver.py").status_code == 404


@pytest.mark.parametrize("steps,every", [(7, 3), (5, 1), (4, 10)])
def test_the_stream_sends_a_preview_every_k_steps_then_the_images(url, steps, every):
    status, evs, _ = generate(url, {"model": "tiny", "label": "b", "n": 3, "steps": steps, "preview_every": every,
                                    "seed": 1, "precision": "fp32"})
    assert status == 200
    kinds = [e for e, _ in evs]
    expected = preview_steps(steps, every)
    assert kinds == ["queued", "start", *["preview"] * len(expected), "done"]
    assert evs[1][1]["previews"] == len(expected)
    previews = [d for e, d in evs if e == "preview"]
    assert [p["step"] for p in previews] == [i + 1 for i in expected] and previews[-1]["step"] == steps
    assert all(len(p["images"]) == 3 and p["first"] == 0 and p["steps"] == steps for p in previews)
    assert all(p["images"][0].startswith("data:image/png;base64,") for p in previews)
    done = done_of(evs)
    assert done["previews"] == len(expected) and done["captions"] == ["b"] * 3 and len(done["images"]) == 3
    assert done["first_preview_seconds"] > 0


def test_the_final_images_are_those_of_minidiffusion_sample_bit_for_bit(url, tmp_path):
    from minidiffusion.cli import main as cli

    status, evs, _ = generate(url, {"model": "fmnist", "label": "sneaker", "n": 2, "steps": 3, "seed": 5})
    done = done_of(evs)
    s = done["settings"]
    assert s["label"] == "Sneaker" and s["precision"] in ("bf16", "fp32") and s["sampler"] == "dpmpp_2m"
    model = DiffusionModel.from_pretrained("fmnist")
    x, _ = model.sample(2, sampler="dpmpp_2m", steps=3, labels=["Sneaker"], guidance=1.0, seed=5,
                        precision=s["precision"])
    assert np.array_equal(npz_images(done), x.numpy())  # the float32 images, every bit
    for k in range(2):  # the PNGs the page shows: exactly the 8-bit pixels of those images
        shown = np.asarray(Image.open(io.BytesIO(decode_url(done["images"][k]))))
        assert np.array_equal(shown, float_to_uint8(x[k])[0].numpy())
    # the command the page shows makes the same files: the .npz's images and the grid PNG, byte for byte
    argv = shlex.split(done["command"])
    assert argv[:2] == ["minidiffusion", "sample"]
    argv[argv.index("--out") + 1] = str(tmp_path / "cli.png")
    assert cli(argv[1:]) == 0
    with np.load(tmp_path / "cli.npz") as f:
        assert np.array_equal(f["images"], npz_images(done))
    assert (tmp_path / "cli.png").read_bytes() == decode_url(done["files"]["grid.png"])


def test_a_schedule_is_the_command_lines_and_refused_where_the_model_has_its_own_grid(url):
    done = done_of(generate(url, {"model": "fmnist", "label": "Bag", "n": 1, "steps": 3, "seed": 2,
                                  "schedule": "exponential", "precision": "fp32"})[1])
    model = DiffusionModel.from_pretrained("fmnist")
    x, _ = model.sample(1, steps=3, labels=["Bag"], seed=2, precision="fp32", schedule="exponential")
    assert np.array_equal(npz_images(done), x.numpy())
    assert done["settings"]["schedule"] == "exponential" and "--schedule exponential" in done["command"]
    plain = done_of(generate(url, {"model": "fmnist", "label": "Bag", "n": 1, "steps": 3, "seed": 2,
                                   "precision": "fp32"})[1])
    assert plain["settings"]["schedule"] is None and "--schedule" not in plain["command"]
    assert not np.array_equal(npz_images(plain), npz_images(done))
    status, _, err = generate(url, {"model": "fmnist-fast", "steps": 2, "schedule": "karras"})
    assert status == 400 and "samples on its own grid; drop the schedule" in err["detail"]
    status, _, err = generate(url, {"model": "fmnist", "steps": 2, "schedule": "linear"})
    assert status == 400 and "schedule must be one of karras, exponential, cosine, auto" in err["detail"]
    status, _, err = generate(url, {**T2I, "schedule": "karras"})
    assert status == 400 and "unknown setting 'schedule'" in err["detail"]


def test_a_sound_model_streams_spectrograms_and_ends_with_the_wavs_sample_writes(url, tmp_path):
    from minidiffusion.cli import main as cli

    status, evs, _ = generate(url, {"model": "instruments", "label": "piano", "n": 1, "steps": 2, "seed": 3,
                                    "precision": "fp32", "preview_every": 1})
    previews = [d for e, d in evs if e == "preview"]
    assert len(previews) == 2 and previews[0]["images"][0].startswith("data:image/png;base64,")
    done = done_of(evs)
    assert done["media"] == "audio" and done["captions"] == ["piano"]
    assert done["images"][0].startswith("data:audio/wav;base64,")
    wav = decode_url(done["images"][0])
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE" and decode_url(done["files"]["samples-0.wav"]) == wav
    argv = shlex.split(done["command"])
    assert argv[-1] == "samples.wav"
    argv[-1] = str(tmp_path / "cli.wav")
    assert cli(argv[1:]) == 0
    assert (tmp_path / "cli.wav").read_bytes() == wav  # the page's sound is the command line's, byte for byte


def test_an_upscaler_takes_an_image_and_gives_the_png_upscale_writes(url, tmp_path):
    from minidiffusion.cli import main as cli

    image = png(40, 30)
    (tmp_path / "init.png").write_bytes(image)
    status, evs, _ = generate(url, {"model": "tiny-sr", "steps": 3, "seed": 4, "preview_every": 1}, image)
    assert [e for e, _ in evs] == ["queued", "start", "preview", "preview", "preview", "done"]
    previews = [d for e, d in evs if e == "preview"]
    assert Image.open(io.BytesIO(decode_url(previews[0]["images"][0]))).size == (80, 60)  # bicubic + residual so far
    for name, settings in (("tiny-sr", {"steps": 3, "seed": 4}), ("photos-sr2", {})):
        done = done_of(generate(url, {"model": name, **settings}, image)[1])
        assert done["captions"] == ["40x30 -> 80x60"] and done["settings"]["n"] == 1
        png_bytes = decode_url(done["files"]["upscaled.png"])
        assert decode_url(done["images"][0]) == png_bytes
        argv = shlex.split(done["command"])  # minidiffusion upscale init.png --out upscaled.png ... --tile 0
        argv[2], argv[4] = str(tmp_path / "init.png"), str(tmp_path / f"{name}.png")
        assert cli(argv[1:]) == 0
        assert (tmp_path / f"{name}.png").read_bytes() == png_bytes  # the page's image is the command line's
    assert [e for e, _ in generate(url, {"model": "photos-sr2"}, image)[1]] == ["queued", "start", "done"]
    for settings, upload, sentence in (
            ({"model": "photos-sr2"}, None, "an upscaler needs an image: upload one"),
            ({"model": "photos-sr2", "guidance": 3}, image, "an upscaler takes no guidance setting"),
            ({"model": "photos-sr2", "steps": 3}, image, "an upscaler takes no steps setting"),
            ({"model": "tiny-sr", "n": 2}, image, "an upscaler takes no n setting"),
            ({"model": "tiny-sr", "steps": 0}, image, "steps must be an integer in 1..1000"),
            ({"model": "photos-sr2"}, png(600, 20), "the page upscales images up to 512x512 pixels, this one is")):
        status, _, err = generate(url, settings, upload)
        assert status == 400 and sentence in err["detail"], err


def test_the_settings_returned_make_the_same_images_again(url):
    status, evs, _ = generate(url, {"model": "tiny", "n": 3, "steps": 3, "seed": None, "sampler": "euler_ancestral",
                                    "precision": "fp32"})
    first = done_of(evs)
    assert isinstance(first["settings"]["seed"], int)  # a random seed was drawn, and is shown
    assert json.loads(first["settings_text"]) == first["settings"]
    assert first["captions"] == ["a", "b", "c"]  # no label: balanced over the classes
    again = done_of(generate(url, json.loads(first["settings_text"]))[1])
    assert again["settings"] == first["settings"]
    assert np.array_equal(npz_images(again), npz_images(first)) and again["images"] == first["images"]
    # a seed past 2**53 (not exact in JavaScript) travels as digits and comes back exact
    big = done_of(generate(url, {**first["settings"], "seed": str(2**63 - 1)})[1])
    assert big["settings"]["seed"] == 2**63 - 1 and '"seed": 9223372036854775807' in big["settings_text"]


def test_text_to_image_prompts_previews_per_image_and_image_to_image(url, t2i_run):
    pipe = TextToImage.from_run(t2i_run)
    # a stochastic sampler runs each image on its own: previews come per image
    status, evs, _ = generate(url, {"model": "tiny-t2i", "prompt": "red apple", "negative_prompt": "green",
                                    "n": 2, "steps": 3, "guidance": 3, "sampler": "euler_ancestral", "seed": 9,
                                    "preview_every": 1})
    previews = [d for e, d in evs if e == "preview"]
    assert [p["first"] for p in previews] == [0, 0, 0, 1, 1, 1] and evs[1][1]["previews"] == 6
    done = done_of(evs)
    x = pipe("red apple", n=2, negative_prompt="green", guidance=3.0, steps=3, sampler="euler_ancestral", seed=9,
             precision=done["settings"]["precision"])
    assert np.array_equal(npz_images(done), x.numpy()) and done["captions"] == ["seed 9", "seed 10"]
    # image-to-image: strength 0.5 of 4 steps runs the last 2, from the upload (the CLI's conversion)
    init = png(20, 24)
    s = {"model": "tiny-t2i", "prompt": "a car", "n": 1, "steps": 4, "strength": 0.5, "seed": 2}
    status, evs, _ = generate(url, s, init)
    done = done_of(evs)
    assert evs[1][1]["steps"] == 2 and len([e for e, _ in evs if e == "preview"]) == 2
    assert done["settings"]["strength"] == 0.5 and len(done["settings"]["init_image_sha256"]) == 64
    path = t2i_run.parent / "init.png"
    path.write_bytes(init)
    x = pipe("a car", n=1, steps=4, seed=2, init_image=load_image(path, 16), strength=0.5,
             precision=done["settings"]["precision"])
    assert np.array_equal(npz_images(done), x.numpy())
    assert "--init-image" in done["command"] and "--strength 0.5" in done["command"]
    # its settings regenerate it with the same upload, and say so without it
    again = done_of(generate(url, done["settings"], init)[1])
    assert np.array_equal(npz_images(again), npz_images(done))
    status, _, err = generate(url, done["settings"])
    assert status == 400 and "made from an init image" in err["detail"]
    status, _, err = generate(url, done["settings"], png(20, 24, seed=1))
    assert status == 400 and "not the one these settings were made from" in err["detail"]


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (10_000, 5_000)).save(buf, format="PNG")  # 50 megapixels in a few kB: a decompression bomb
    return buf.getvalue()


FM = {"model": "fmnist", "steps": 2, "n": 1}
T2I = {"model": "tiny-t2i", "prompt": "a tree", "steps": 2}
BAD = [  # (settings, init image or None, status, what the sentence says)
    ({**FM, "steps": 0}, None, 400, "steps must be an integer in 1..1000, got 0"),
    ({**FM, "steps": 1001}, None, 400, "steps must be an integer in 1..1000, got 1001"),
    ({**FM, "steps": 2.5}, None, 400, "steps must be an integer in 1..1000, got 2.5"),
    ({**FM, "guidance": "abc"}, None, 400, "guidance must be a number in [0, 100], got 'abc'"),
    ({**FM, "guidance": 101}, None, 400, "guidance must be a number in [0, 100], got 101"),
    ({**FM, "model": "nope"}, None, 400,
     f"unknown model 'nope'; choose one of {', '.join(SHIPPED)}, tiny-t2i, tiny-sr, tiny"),
    ({**FM, "model": "../../etc/passwd"}, None, 400, "unknown model '../../etc/passwd'"),
    ({**FM, "model": ["fmnist"]}, None, 400, "unknown model ['fmnist']"),
    ({"steps": 2}, None, 400, "give a model: one of fmnist"),
    ({**FM, "sampler": "nope"}, None, 400, "sampler must be one of ddpm, ddim"),
    ({**FM, "n": 0}, None, 400, "n must be an integer in 1..16, got 0"),
    ({**FM, "n": 17}, None, 400, "n must be an integer in 1..16, got 17"),
    ({**FM, "seed": -1}, None, 400, "seed must be an integer in 0..9223372036854775807"),
    ({**FM, "seed": 2**63}, None, 400, "seed must be an integer in 0..9223372036854775807"),
    ({**FM, "seed": "abc"}, None, 400, "seed must be an integer in 0..9223372036854775807"),
    ({**FM, "label": "hat"}, None, 400, "unknown label 'hat'; choose one of T-shirt/top"),
    ({**FM, "label": 10}, None, 400, "label index 10 is out of range; choose 0..9"),
    ({**FM, "precision": "fp8"}, None, 400, "precision must be one of auto, bf16, fp16, fp32"),
    ({**FM, "preview_every": 0}, None, 400, "preview_every must be an integer in 1..1000"),
    ({**FM, "stpes": 2}, None, 400, "unknown setting 'stpes' for image models; the settings are guidance, kind"),
    ({**FM, "sampler": ["euler"]}, None, 400, "sampler must be one of ddpm, ddim"),
    ({**FM, "kind": "text-to-image"}, None, 400, "these settings are for a 'text-to-image' model; this one is"),
    ({**FM, "prompt": "a hat"}, None, 400, "unknown setting 'prompt'"),
    (FM, png(8, 8), 400, "image-to-image needs a text-to-image model"),
    ({**T2I, "prompt": "x" * 10_000}, None, 400, "prompt must be at most 1000 characters, got 10000"),
    ({**T2I, "negative_prompt": "x" * 1001}, None, 400, "negative_prompt must be at most 1000 characters, got 1001"),
    ({**T2I, "prompt": 7}, None, 400, "prompt must be a string"),
    ({"model": "tiny-t2i"}, None, 400, "this is a text-to-image model: give a prompt"),
    ({**T2I, "label": "a"}, None, 400, "a text-to-image model takes a prompt, not a label"),
    (T2I, b"hello, this is a text file, not an image\n", 400, "the init image is not an image file this server reads"),
    (T2I, png(64, 64)[:700], 400, "the init image is damaged or truncated"),
    (T2I, b"", 400, "the init image is an empty file"),
    (T2I, _big_png(), 400, "the init image is 10000x5000 pixels (50.0 megapixels); the limit is 16 megapixels"),
    ({**T2I, "strength": 1.5}, png(8, 8), 400, "strength must be a number in [0, 1], got 1.5"),
    ({**T2I, "prompt": "x" * 300_000}, None, 413, "the request is"),
]


@pytest.mark.parametrize("settings,image,status,sentence", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_input_gets_one_sentence_and_the_server_goes_on(url, settings, image, status, sentence):
    got, evs, err = generate(url, settings, image)
    assert got == status, (got, err, evs[:1])
    detail = err["detail"]
    assert isinstance(detail, str) and sentence in detail, detail
    assert "\n" not in detail and len(detail) < 400 and "Traceback" not in detail
    assert httpx.get(url + "/api/status").json()["ok"]


def test_bad_bodies_and_the_server_still_answers(url):
    r = httpx.post(url + "/api/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"].startswith("the settings are not JSON")
    r = httpx.post(url + "/api/generate", json=[1, 2])
    assert r.status_code == 400 and r.json()["detail"] == "the settings must be a JSON object, got list"
    r = httpx.post(url + "/api/generate", content=b"model=fmnist", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "send the settings as JSON" in r.json()["detail"]
    r = httpx.post(url + "/api/generate", files={"init_image": ("a.png", png(8, 8), "image/png")})
    assert r.status_code == 400 and "no settings field" in r.json()["detail"]
    r = httpx.post(url + "/api/generate", json=FM, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "another site" in r.json()["detail"]
    assert httpx.get(url + "/api/status").json()["queue"]["running"] == 0
    status, evs, _ = generate(url, {"model": "tiny", "steps": 2, "n": None, "sampler": None, "precision": "fp32"})
    assert status == 200 and evs[-1][0] == "done"  # null: the default
    assert evs[-1][1]["settings"]["n"] == 4 and evs[-1][1]["settings"]["sampler"] == "dpmpp_2m"


def _status(u: str) -> dict:
    return httpx.get(u + "/api/status").json()["queue"]


def _wait(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_eight_concurrent_clients_finish_and_the_next_gets_429():
    gate = threading.Event()
    app = build_app({"tiny": lambda: tiny_model(lambda net: Slow(net, gate))}, queue_limit=8)
    settings = {"model": "tiny", "n": 1, "steps": 2, "precision": "fp32"}
    with BackgroundServer(app) as u:
        results: list = [None] * 8

        def client(i):
            results[i] = generate(u, {**settings, "seed": i})

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        _wait(lambda: (q := _status(u))["running"] + q["waiting"] == 8)
        for _ in range(2):  # beyond the limit: refused at once, with a sentence
            start = time.monotonic()
            r = httpx.post(u + "/api/generate", json=settings, timeout=10)
            assert r.status_code == 429 and time.monotonic() - start < 5
            assert r.json()["detail"].startswith("the server is busy: 8 requests are running or waiting")
            assert r.headers["retry-after"] == "2"
        gate.set()
        for t in threads:
            t.join(60)
        assert all(r is not None and r[0] == 200 and r[1][-1][0] == "done" for r in results)
        seeds = sorted(r[1][-1][1]["settings"]["seed"] for r in results)
        assert seeds == list(range(8))
        q = _status(u)
        assert (q["finished"], q["refused"], q["running"], q["waiting"]) == (8, 2, 0, 0)


def test_a_client_that_goes_away_frees_its_place():
    gate = threading.Event()
    slow = {"slow": lambda: tiny_model(lambda net: Slow(net, delay=0.02)),
            "gated": lambda: tiny_model(lambda net: Slow(net, gate))}
    app = build_app(slow, queue_limit=2)
    with BackgroundServer(app) as u:
        # mid-generation: 500 steps would take 10 s; it stops at the next step after the client leaves
        with httpx.Client(timeout=30) as c, c.stream("POST", u + "/api/generate",
                                                     json={"model": "slow", "steps": 500, "n": 1}) as r:
            assert r.status_code == 200
            for event, _ in events(r):
                if event == "preview":
                    break
        start = time.monotonic()
        _wait(lambda: _status(u)["cancelled"] == 1, timeout=5)
        assert time.monotonic() - start < 3 and _status(u)["running"] == 0
        # waiting: a gated job runs, a second waits and leaves; its place is free before the first ends
        first = threading.Thread(target=generate, args=(u, {"model": "gated", "steps": 2, "n": 1}))
        first.start()
        _wait(lambda: _status(u)["running"] == 1)
        with httpx.Client(timeout=30) as c, c.stream("POST", u + "/api/generate",
                                                     json={"model": "gated", "steps": 2, "n": 1}) as r:
            assert r.status_code == 200 and next(events(r))[1]["position"] == 1
        _wait(lambda: _status(u)["cancelled"] == 2, timeout=5)
        assert _status(u)["waiting"] == 0
        with httpx.Client(timeout=30) as c, c.stream("POST", u + "/api/generate",
                                                     json={"model": "gated", "steps": 2, "n": 1, "seed": 1}) as r:
            assert r.status_code == 200  # admitted while the first still runs: the place was freed
            gate.set()
            assert [e for e, _ in events(r)][-1] == "done"
        first.join(30)
        q = _status(u)
        assert (q["finished"], q["cancelled"], q["refused"], q["running"], q["waiting"]) == (2, 2, 0, 0, 0)


def test_a_failing_job_reports_an_error_and_the_server_goes_on():
    class Broken(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *args, **kwargs):
            raise RuntimeError("out of memory (a stand-in)")

    app = build_app({"broken": lambda: tiny_model(Broken), "tiny": lambda: tiny_model()})
    with BackgroundServer(app) as u:
        status, evs, _ = generate(u, {"model": "broken", "steps": 2, "n": 1})
        assert status == 200 and evs[-1] == ("error", {"message": "generation failed (RuntimeError: out of memory "
                                                                  "(a stand-in))"})
        status, evs, _ = generate(u, {"model": "tiny", "steps": 2, "n": 1})
        assert evs[-1][0] == "done" and _status(u)["failed"] == 1


def test_hosts_runs_and_ports_are_checked(tmp_path):
    app = build_app({"tiny": lambda: tiny_model()}, allowed_hosts=["127.0.0.1", "localhost"])
    with BackgroundServer(app) as u:
        assert httpx.get(u + "/api/status").status_code == 200
        assert httpx.get(u + "/api/status", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
    with pytest.raises(ConfigError, match="does not exist: give the --out folder"):
        model_sources([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no model.safetensors"):
        build_app(model_sources([tmp_path / "empty"])).state.service.load_all()
    names = list(model_sources([tmp_path / "empty", tmp_path / "empty"]))
    assert names == [*SHIPPED, "empty", "empty-2"]
    from minidiffusion.serve.server import _bind

    with _bind("127.0.0.1", 0) as sock:  # asyncio sets TCP_NODELAY (events sent at once, not ~40 ms late) on
        assert sock.proto == socket.IPPROTO_TCP  # the connections of such a socket only
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1:"):
            main("127.0.0.1", busy.getsockname()[1], device="cpu")


def test_serving_loads_no_training_code_and_serve_imports_none():
    from test_layout import PACKAGE, imports_of

    graph = imports_of(PACKAGE)
    mods = [m for m in graph if m.startswith("minidiffusion.serve")]
    assert {"minidiffusion.serve.server", "minidiffusion.serve.kinds"} <= set(mods)
    for mod in mods:
        bad = [d for d in graph[mod] if d.startswith(("minidiffusion.learner", "minidiffusion.recipes"))]
        assert not bad, (mod, bad)
    code = ("import sys\nfrom minidiffusion.serve.server import build_app, model_sources\n"
            "build_app(model_sources()).state.service.load_all()\n"
            "print(sorted(k for k in sys.modules if k.startswith(('minidiffusion.learner', 'minidiffusion.recipes'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_minidiffusion_serve_serves_until_ctrl_c_and_prints_its_summary(tmp_path):
    import signal

    run = tmp_path / "tiny-run"
    run.mkdir()
    model = tiny_model()
    from minidiffusion.pipelines.image import save_model

    save_model(model.net, model.cfg, model.class_names, run / "model.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "minidiffusion", "serve", "--port", str(port), "--run", str(run), "--device", "cpu"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: proc.poll() is None and _answers(url), timeout=90)
        assert [m["name"] for m in httpx.get(url + "/api/models").json()["models"]] == [*SHIPPED, "tiny-run"]
        status, evs, _ = generate(url, {"model": "tiny-run", "label": "c", "n": 1, "steps": 2})
        assert status == 200 and done_of(evs)["captions"] == ["c"]
        assert shlex.quote(str(run)) in done_of(evs)["command"]  # the run's own `minidiffusion sample` argument
        assert httpx.get(url + "/api/status", headers={"host": "evil.example"}).status_code == 400  # loopback only
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert f"{', '.join(SHIPPED)}, tiny-run at http://127.0.0.1:{port}/ (Ctrl-C stops)" in err
    assert json.loads(out.strip().splitlines()[-1]) == {"url": f"http://127.0.0.1:{port}/",
                                                        "models": [*SHIPPED, "tiny-run"]}


def test_minidiffusion_serve_refuses_bad_options_and_says_how_to_get_the_web_extra(tmp_path):
    from minidiffusion.cli import main as cli

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    out = run("import sys\nfrom minidiffusion.cli import main\nsys.exit(main(['serve', '--port', '70000']))")
    assert out.returncode == 2 and "argument --port: must be an integer in 0..65535, got '70000'" in out.stderr
    assert cli(["serve", "--run", str(tmp_path / "missing"), "--port", "0"]) == 2  # before anything listens
    out = run("import sys\nsys.modules['fastapi'] = None  # as if the web extra were not installed\n"
              "from minidiffusion.cli import main\nsys.exit(main(['serve']))")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("minidiffusion: error: the web page needs the web extra (fastapi is not installed): "
                                  "pip install 'minidiffusion[web]'")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/api/status", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_overhead_benchmark_runs_and_prints_its_table():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_overhead.py"
    spec = importlib.util.spec_from_file_location("bench_serve_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(tiny_model(), [2], steps=3, repeats=2, precision="fp32", name="tiny", where="thread")
    (row,) = result["rows"]
    assert row["n"] == 2 and row["plain_s"] > 0 and row["served_s"] > 0 and 0 < row["first_preview_s"] < row["served_s"]
    assert row["cpu_overhead_pct"] is not None and row["previews_in_run_pct"] > 0 and row["transport_ms"] > 0
    table = bench.markdown(result)
    assert table.splitlines()[2].startswith("| images | plain sample |") and "| 2 | " in table
