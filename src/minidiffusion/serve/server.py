"""The web server: a page to generate images and watch the denoising, and the JSON + server-sent-event API.

`build_app(models)` returns the FastAPI app for a fixed set of models ({name: loader}); `main(host,
port, runs)` serves the shipped models and the named run directories (what `minidiffusion serve`
calls). The endpoints (docs/serve.md has their contracts):

- `GET /` the page; `GET /static/NAME` its script and style sheet (every asset is in the package).
- `GET /api/models` the models with their kind, inputs, classes and defaults; the samplers; the limits.
- `POST /api/generate` the settings (JSON, or a form with a `settings` field and an `init_image` file)
  -> a `text/event-stream`: `queued`, `start`, `preview` (the predicted clean image every k-th step),
  then `done` (the images, the grid and .npz to download, the settings that make them again) or
  `error`. Bad settings are refused before anything runs: HTTP 400 (413 for a body too large) with
  `{"detail": one sentence}`, the command line's sentences.
- `GET /api/status` the queue: running, waiting, its limit, and counts of what finished.

Requests go through one bounded queue (`JobQueue`): `workers` jobs run at a time (one: a model on
one device runs one batch at a time at full speed), the others wait in order, and a request beyond
`queue_limit` jobs gets HTTP 429 with a sentence at once. A client that goes away stops its job at
the next sampler step (or before it starts) and frees its place. Model names come only from the
list the server was started with; nothing a request sends becomes a file path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import ipaddress
import json
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError, DataError, MinidiffusionError

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware
except ImportError as e:  # the web extra is optional: say what to install, in one sentence
    raise MinidiffusionError(f"the web page needs the web extra ({e.name} is not installed): "
                             "pip install 'minidiffusion[web]'") from None

from .kinds import Kind, Limits, Outputs, data_url, kind_of, preview_steps

__all__ = ["build_app", "main", "model_sources", "ModelSource", "JobQueue", "BackgroundServer", "read_init_image",
           "DEFAULT_QUEUE_LIMIT"]

DEFAULT_QUEUE_LIMIT = 16  # jobs running or waiting; the next request gets HTTP 429
MAX_SETTINGS_BYTES = 256 * 2**10  # a JSON body (or the settings field of a form)
MAX_PENDING_PREVIEWS = 64  # previews a slow client has not read yet; past this, previews are skipped, not queued
KEEPALIVE_S = 10.0
STATIC = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' data: blob:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


class Refused(Exception):
    """A request the server answers with `status` and one sentence, before any work."""

    def __init__(self, status: int, sentence: str, headers: Mapping[str, str] | None = None):
        super().__init__(sentence)
        self.status, self.sentence, self.headers = status, sentence, dict(headers or {})


class _Cancelled(Exception):
    """The client went away: stop sampling at this step."""


# -- the models ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """A model the server can load: `load()` returns it; `cli` is its `minidiffusion sample` argument
    (`--pretrained NAME` or a run directory), shown with the settings."""

    load: Callable[[], Any]
    cli: str | None = None

    def __call__(self) -> Any:
        return self.load()


def _shipped_text_to_image() -> list[str]:
    folder = resources.files("minidiffusion.assets")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "text_encoder.toml").is_file()
                  and (p / "model.safetensors").is_file())


def model_sources(runs: Iterable[str | Path] = (), device: Any = "cpu") -> dict[str, ModelSource]:
    """Return {name: ModelSource}: the shipped models (by name), then each run directory (by its folder name,
    `-2`, `-3` ... where a name repeats). A run directory holding `text_encoder.toml` is a text-to-image
    pipeline, one whose model is an upscaler (kind superres or superres-diffusion) an upscaler. A path that is
    no directory raises ConfigError; a damaged run is refused when it loads."""
    import shlex

    from ..artifacts import component_kind
    from ..pipelines.image import DiffusionModel, shipped_models
    from ..pipelines.superres import DIFFUSION_KIND, KIND, Upscaler, shipped_upscalers
    from ..pipelines.text_to_image import TextToImage

    out: dict[str, ModelSource] = {}

    def add(name: str, src: ModelSource) -> None:
        base, k = name, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out[name] = src

    for name in shipped_models():
        add(name, ModelSource(lambda name=name: DiffusionModel.from_pretrained(name, device=device),
                              f"--pretrained {name}"))
    for name in _shipped_text_to_image():
        add(name, ModelSource(lambda name=name: TextToImage.from_pretrained(name, device=device),
                              f"--pretrained {name}"))
    for name in shipped_upscalers():
        add(name, ModelSource(lambda name=name: Upscaler.from_pretrained(name, device=device),
                              f"--pretrained {name}"))
    for run in runs:
        path = Path(run)
        if not path.is_dir():
            what = "is a file" if path.exists() else "does not exist"
            raise ConfigError(f"--run {path} {what}: give the --out folder of `minidiffusion train`")
        weights = path / "model.safetensors"
        if (path / "text_encoder.toml").is_file():
            src = ModelSource(lambda path=path: TextToImage.from_run(path, device=device), shlex.quote(str(path)))
        elif weights.is_file() and component_kind(weights) in (KIND, DIFFUSION_KIND):
            src = ModelSource(lambda path=path: Upscaler.from_run(path, device=device),
                              f"--run {shlex.quote(str(path))}")
        else:
            src = ModelSource(lambda path=path: DiffusionModel.from_run(path, device=device), shlex.quote(str(path)))
        add(path.resolve().name or "run", src)
    return out


class Registry:
    """The fixed set of models: each loaded once, on first use (thread-safe), with its kind."""

    def __init__(self, loaders: Mapping[str, Callable[[], Any]]):
        if not loaders:
            raise ConfigError("the server has no model to serve: give a run directory, or install the shipped ones")
        self.loaders = dict(loaders)
        self._loaded: dict[str, tuple[Any, Kind]] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """Return the model names, in the order the server was given them."""
        return list(self.loaders)

    def get(self, name: Any) -> tuple[Any, Kind]:
        """Return (model, kind) for a name from the list; ConfigError for any other name or a model that failed."""
        if not isinstance(name, str) or name not in self.loaders:
            shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
            raise ConfigError(f"unknown model {shown}; choose one of {', '.join(self.loaders)}")
        with self._lock:
            if name in self._errors:
                raise ConfigError(self._errors[name])
            if name not in self._loaded:
                try:
                    model = self.loaders[name]()
                    self._loaded[name] = (model, kind_of(model))
                except MinidiffusionError as e:
                    self._errors[name] = f"model {name} cannot be loaded: {e}"
                    raise ConfigError(self._errors[name]) from None
            return self._loaded[name]

    def source(self, name: str) -> str | None:
        """Return the model's `minidiffusion sample` argument (`--pretrained NAME`, a run path), or None."""
        return getattr(self.loaders[name], "cli", None)


# -- the queue ----------------------------------------------------------------------------------

@dataclass(eq=False)
class Ticket:
    """One admitted request: its place in the queue, its job and the flag that stops it."""

    id: int
    admitted: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None
    started: float | None = None
    released: bool = False


class JobQueue:
    """At most `limit` admitted jobs (running or waiting), `workers` of them running, in the order they came."""

    def __init__(self, limit: int = DEFAULT_QUEUE_LIMIT, workers: int = 1):
        if not (isinstance(limit, int) and limit >= 1 and isinstance(workers, int) and workers >= 1):
            raise ConfigError(f"the queue needs a limit >= 1 and workers >= 1, got {limit!r} and {workers!r}")
        self.limit, self.workers = limit, workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minidiffusion-serve")
        self._lock = threading.Lock()
        self._tickets: list[Ticket] = []  # admitted, not released, in order
        self._next = 0
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0, "refused": 0}

    def admit(self) -> Ticket | None:
        """Return a ticket for a new job, or None (and count a refusal) when `limit` jobs are already admitted."""
        with self._lock:
            if len(self._tickets) >= self.limit:
                self.counts["refused"] += 1
                return None
            self._next += 1
            ticket = Ticket(self._next)
            self._tickets.append(ticket)
            return ticket

    def submit(self, ticket: Ticket, fn: Callable[[], None]) -> None:
        """Run `fn` when a worker is free (it is skipped when the ticket was cancelled meanwhile)."""
        def run():
            ticket.started = time.perf_counter()
            if not ticket.cancel.is_set():
                fn()
        ticket.future = self._pool.submit(run)
        ticket.future.add_done_callback(lambda _: self.release(ticket, "cancelled" if ticket.cancel.is_set()
                                                               else "finished"))

    def release(self, ticket: Ticket, outcome: str = "finished") -> None:
        """Free the ticket's place (once; later calls do nothing) and count its outcome."""
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            self._tickets.remove(ticket)
            self.counts[outcome] += 1

    def cancel(self, ticket: Ticket) -> None:
        """Stop the ticket's job: before it starts (its place is freed now) or at its next step."""
        ticket.cancel.set()
        if ticket.future is None or ticket.future.cancel():
            self.release(ticket, "cancelled")

    def position(self, ticket: Ticket) -> int:
        """Return how many admitted jobs are ahead of this one (0: it runs or runs next)."""
        with self._lock:
            return self._tickets.index(ticket) if ticket in self._tickets else 0

    def status(self) -> dict:
        """Return {running, waiting, limit, workers, finished, cancelled, failed, refused}."""
        with self._lock:
            running = sum(t.started is not None for t in self._tickets)
            return {"running": running, "waiting": len(self._tickets) - running, "limit": self.limit,
                    "workers": self.workers, **self.counts}

    def shutdown(self) -> None:
        """Cancel every admitted job and stop the workers."""
        with self._lock:
            tickets = list(self._tickets)
        for t in tickets:
            self.cancel(t)
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- requests -----------------------------------------------------------------------------------

def read_init_image(data: bytes, size: int | None, limits: Limits | None = None) -> tuple[Any, str]:
    """Return (the init image as float32 [1, 3, size, size] in [-1, 1], the file's sha256) for uploaded bytes.

    The same conversion as `minidiffusion sample --init-image FILE` (`pipelines.outputs.load_image`); with
    `size` None the decoded PIL image itself, as `minidiffusion upscale FILE` reads it. Refused
    with DataError: no bytes, not an image (PNG, JPEG, WebP, BMP, GIF), more than `limits.max_pixels` pixels
    (read from the header: a decompression bomb is never decoded), damaged or truncated.
    """
    from PIL import Image, UnidentifiedImageError

    from ..pipelines.outputs import load_image

    limits = limits or Limits()
    if not data:
        raise DataError("the init image is an empty file; upload a PNG or JPEG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP", "BMP", "GIF")) as img:
                w, h = img.size
                if w * h > limits.max_pixels:
                    raise DataError(f"the init image is {w}x{h} pixels ({w * h / 1e6:.1f} megapixels); the limit is "
                                    f"{limits.max_pixels / 1e6:g} megapixels: upload a smaller image")
                img.load()  # decode it all: a truncated or damaged file is refused here
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError("the init image is not an image file this server reads; upload a PNG or JPEG file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"the init image has more than {limits.max_pixels / 1e6:g} megapixels; "
                        "upload a smaller image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"the init image is damaged or truncated ({e}); upload a complete PNG or JPEG file") from None
    sha = hashlib.sha256(data).hexdigest()
    if size is None:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.copy(), sha
    with tempfile.TemporaryDirectory(prefix="minidiffusion-serve-") as d:
        path = Path(d) / "init"
        path.write_bytes(data)
        image = load_image(path, size)
    return image, sha


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"the request is {int(declared) / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the request is larger than the limit of {limit / 2**20:.1f} MB")
        chunks.append(chunk)
    return b"".join(chunks)


def _settings_json(text: bytes | str) -> dict:
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"the settings are not JSON ({e}); send a JSON object such as "
                          '{"model": "fmnist", "steps": 20}') from None
    if not isinstance(body, dict):
        raise ConfigError(f"the settings must be a JSON object, got {type(body).__name__}")
    return body


async def _read_request(request: Request, limits: Limits) -> tuple[dict, bytes | None]:
    """Return (settings, init image bytes or None) from a JSON body or a multipart form."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        return _settings_json(await _read_body(request, MAX_SETTINGS_BYTES)), None
    if ctype != "multipart/form-data":
        raise Refused(415, "send the settings as JSON (Content-Type: application/json) or as a form "
                           "(multipart/form-data) with a settings field and an optional init_image file")
    body = await _read_body(request, limits.max_upload_bytes + MAX_SETTINGS_BYTES)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=4, max_part_size=MAX_SETTINGS_BYTES)
    except Exception as e:  # python-multipart's and starlette's parse errors: a bad form is bad input
        raise ConfigError(f"the form cannot be read ({getattr(e, 'detail', None) or e}); send a settings field "
                          "and an optional init_image file") from None
    try:
        text = form.get("settings")
        if not isinstance(text, str):
            raise ConfigError("the form has no settings field: send the settings as JSON in a field named settings")
        upload = form.get("init_image")
        data = None
        if upload is not None and not isinstance(upload, str):
            data = await upload.read()
            if len(data) > limits.max_upload_bytes:
                raise Refused(413, f"the init image is {len(data) / 2**20:.1f} MB; the limit is "
                                   f"{limits.max_upload_bytes / 2**20:.1f} MB")
            if not data and not upload.filename:
                data = None  # an empty file field: no image chosen
        return _settings_json(text), data
    finally:
        await form.close()


def _check_origin(request: Request) -> None:
    """Refuse a POST from a page of another site (a form it submits to this machine's server)."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise Refused(403, "requests from another site's page are refused; use the page this server serves")


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class _JobStream(StreamingResponse):
    """A streaming response that stops its job however the response ends (finished, client gone, never begun)."""

    def __init__(self, content, on_close: Callable[[], None], **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


# -- the service --------------------------------------------------------------------------------

class Service:
    """The models, the queue and the limits behind the app (`app.state.service`)."""

    def __init__(self, models: Mapping[str, Callable[[], Any]], queue: JobQueue, limits: Limits):
        self.registry, self.queue, self.limits = Registry(models), queue, limits

    def load_all(self) -> None:
        """Load every model now (`main` does, so a damaged run is one sentence before the server starts)."""
        for name in self.registry.names:
            self.registry.get(name)

    def describe(self) -> dict:
        """Return what `GET /api/models` sends: the models (or each one's load error), samplers, precisions,
        limits and the queue."""
        from ..device import PRECISIONS
        from ..diffusion.samplers import SAMPLERS

        models = []
        for name in self.registry.names:
            try:
                model, kind = self.registry.get(name)
                models.append({"name": name, **kind.describe(model), "source": self.registry.source(name)})
            except ConfigError as e:
                models.append({"name": name, "error": str(e)})
        return {"models": models, "samplers": list(SAMPLERS), "precisions": list(PRECISIONS),
                "limits": self.limits.describe(), "queue": self.queue.status()}

    async def prepare(self, request: Request) -> tuple[Any, Kind, dict, Any]:
        """Return (model, kind, settings, init image or None) for a request, everything checked."""
        body, upload = await _read_request(request, self.limits)
        if "model" not in body:
            raise ConfigError(f"give a model: one of {', '.join(self.registry.names)}")
        name = body["model"]
        model, kind = await run_in_threadpool(self.registry.get, name)
        settings = kind.settings(model, body, self.limits, upload is not None)
        init = None
        if upload is not None:
            init, sha = await run_in_threadpool(read_init_image, upload, kind.init_size(model), self.limits)
            kind.check_upload(model, init, self.limits)
            sent = body.get("init_image_sha256")
            if sent is not None and sent != sha:
                raise ConfigError("the uploaded init image is not the one these settings were made from "
                                  f"(sha256 {sha[:12]}..., the settings name {str(sent)[:12]}...)")
            settings["init_image_sha256"] = sha
        return model, kind, {"model": name, "kind": kind.name, **settings}, init

    def job(self, ticket: Ticket, model: Any, kind: Kind, settings: dict, init: Any,
            emit: Callable[[str, Any], None], pending: list[int]) -> Callable[[], None]:
        """Return the function a worker runs: sample with previews, then emit `done` (or `error`)."""
        steps = kind.steps_run(settings)
        every = settings["preview_every"]
        per_image = kind.runs_per_image(settings)
        keep = set(preview_steps(steps, every))
        expected = len(keep) * (settings["n"] if per_image else 1)
        stats = {"previews": 0, "dropped": 0, "first": None, "preview_seconds": 0.0}

        def report(i: int, total: int, sigma: float, first: int, images: Callable[[], Any]) -> None:
            if ticket.cancel.is_set():
                raise _Cancelled
            if i not in keep:
                return
            if pending[0] - pending[1] >= MAX_PENDING_PREVIEWS:
                stats["dropped"] += 1  # the client reads slower than we sample: skip, never pile up
                return
            t = time.perf_counter()
            items = kind.encode_preview(images().cpu())
            now = time.perf_counter()
            stats["preview_seconds"] += now - t  # what previews cost this job: decoding (latents) and PNGs
            if stats["first"] is None:
                stats["first"] = now - ticket.admitted
            stats["previews"] += 1
            pending[0] += 1
            emit("preview", {"step": i + 1, "steps": total, "sigma": sigma, "first": first, "images": items,
                             "elapsed": round(now - ticket.admitted, 4)})

        def work() -> None:
            start = time.perf_counter()
            emit("start", {"steps": steps, "previews": expected, "n": settings["n"], "per_image": per_image,
                           "media": kind.media, "captions": kind.captions(model, settings), "settings": settings})
            outcome = None
            try:
                out: Outputs = kind.run(model, settings, init, report)
                seconds = time.perf_counter() - start
                source = self.registry.source(settings["model"])
                outcome = ("done", {
                    "media": out.media, "images": out.items, "captions": out.captions,
                    "files": {name: data_url(mime, data) for name, (mime, data) in out.files.items()},
                    "settings": settings, "settings_text": json.dumps(settings, indent=2),
                    "command": kind.command_line(source, settings), "seconds": round(seconds, 4),
                    "first_preview_seconds": None if stats["first"] is None else round(stats["first"], 4),
                    "previews": stats["previews"], "dropped": stats["dropped"],
                    "preview_seconds": round(stats["preview_seconds"], 4)})
                self.queue.release(ticket, "finished")
            except _Cancelled:
                self.queue.release(ticket, "cancelled")
            except Exception as e:  # noqa: BLE001 - a failed job is reported to its client; the server goes on
                if not isinstance(e, MinidiffusionError):
                    traceback.print_exc(file=sys.stderr)
                self.queue.release(ticket, "failed")
                outcome = ("error", {"message": str(e) if isinstance(e, MinidiffusionError)
                                     else f"generation failed ({type(e).__name__}: {e})"})
            if outcome is not None:  # after the release: a client that reads `done` may send its next request
                emit(*outcome)

        return work

    async def stream(self, request: Request):
        """Return the event-stream response for a generate request (or raise Refused / ConfigError first)."""
        _check_origin(request)
        model, kind, settings, init = await self.prepare(request)
        ticket = self.queue.admit()
        if ticket is None:
            raise Refused(429, f"the server is busy: {self.queue.limit} requests are running or waiting, its limit; "
                               "try again in a moment", {"Retry-After": "2"})
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        pending = [0, 0]  # previews emitted, previews sent

        def emit(event: str, data: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (event, data))
            except RuntimeError:  # the loop has closed (server shutting down)
                pass

        self.queue.submit(ticket, self.job(ticket, model, kind, settings, init, emit, pending))

        async def body():
            yield _sse("queued", {"position": self.queue.position(ticket), "id": ticket.id})
            shown, quiet = None, time.monotonic()
            while True:
                try:
                    event, data = await asyncio.wait_for(events.get(), timeout=0.25)
                except TimeoutError:
                    if ticket.started is None and (pos := self.queue.position(ticket)) != shown:
                        shown = pos
                        yield _sse("queued", {"position": pos, "id": ticket.id})
                    elif time.monotonic() - quiet > KEEPALIVE_S:
                        quiet = time.monotonic()
                        yield ": keep-alive\n\n"
                    continue
                if event == "preview":
                    pending[1] += 1
                quiet = time.monotonic()
                yield _sse(event, data)
                if event in ("done", "error"):
                    return

        return _JobStream(body(), lambda: self.queue.cancel(ticket), media_type="text/event-stream",
                          headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


# -- the app ------------------------------------------------------------------------------------

def _static(name: str) -> bytes:
    return (resources.files("minidiffusion.serve") / "static" / name).read_bytes()


def build_app(models: Mapping[str, Callable[[], Any]], *, queue_limit: int = DEFAULT_QUEUE_LIMIT, workers: int = 1,
              limits: Limits | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """Return the FastAPI app serving `models` ({name: a callable returning a DiffusionModel or TextToImage}).

    Each model loads on first use (or all at once with `app.state.service.load_all()`). At most `queue_limit`
    requests run or wait at once (`workers` of them running); `limits` bounds images, prompts and uploads;
    `allowed_hosts` (e.g. the loopback names) refuses requests whose Host header names another host.
    """
    limits = limits or Limits()
    service = Service(models, JobQueue(queue_limit, workers), limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.queue.shutdown()  # stop what runs and waits: the server is going away

    app = FastAPI(title="minidiffusion", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return JSONResponse({"detail": e.sentence}, status_code=e.status, headers=e.headers)

    @app.exception_handler(MinidiffusionError)
    async def bad_input(request: Request, e: MinidiffusionError):
        return JSONResponse({"detail": str(e)}, status_code=400)

    page_headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

    @app.get("/")
    async def index():
        return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=page_headers)

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC:  # a fixed list: nothing in a URL becomes a path
            raise Refused(404, f"there is no static file {name[:80]!r}")
        return Response(_static(name), media_type=STATIC[name], headers=page_headers)

    @app.get("/api/models")
    async def list_models():
        return JSONResponse(await run_in_threadpool(service.describe))

    @app.get("/api/status")
    async def status():
        return {"ok": True, "queue": service.queue.status()}

    @app.post("/api/generate")
    async def generate(request: Request):
        return await service.stream(request)

    return app


# -- running it ---------------------------------------------------------------------------------

def _bind(host: str, port: int) -> socket.socket:
    """Return a listening socket on host:port; ConfigError with a sentence when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host} is not an address of this machine ({e.strerror}); use 127.0.0.1") from None
    family, kind, proto, _, addr = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets' connections (else Nagle's
    # algorithm holds each small event ~40 ms for the client's delayed ACK)
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); give another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BackgroundServer:
    """Serve an app with uvicorn in a thread, on a free port unless given: `with BackgroundServer(app) as url:`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.sock = _bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def main(host: str = "127.0.0.1", port: int = 7860, runs: Iterable[str | Path] = (), *, device: str = "auto",
         queue_limit: int = DEFAULT_QUEUE_LIMIT) -> dict:
    """Serve the page for the shipped models and `runs` on host:port until Ctrl-C; return {url, models}.

    Every model is loaded first, so a damaged run directory stops this with one sentence (ConfigError)
    before anything listens. On a host other than loopback the page is open to the network (no login):
    a warning says so.
    """
    from ..config import check_number
    from ..device import resolve_device

    check_number("port", port, lo=0, hi=65535, integer=True)
    check_number("queue", queue_limit, lo=1, hi=10_000, integer=True)
    sources = model_sources(runs, resolve_device(device))
    loopback = _is_loopback(host)
    hosts = None if not loopback else [*LOOPBACK_HOSTS, host]
    app = build_app(sources, queue_limit=queue_limit, allowed_hosts=hosts)
    app.state.service.load_all()
    sock = _bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/"
    if not loopback:
        print(f"minidiffusion serve: warning: listening on {host}: anyone who can reach this machine can use the "
              "page (there is no login)", file=sys.stderr)
    print(f"minidiffusion serve: {', '.join(sources)} at {url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises again the Ctrl-C it has handled: the server stopped cleanly
        pass
    finally:
        sock.close()
    return {"url": url, "models": list(sources)}
