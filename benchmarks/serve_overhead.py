"""What the web page costs: time to the first preview, and streaming previews against plain sampling.

For each batch size, three ways to make the same images with the shipped model at `--steps` steps,
interleaved `--repeats` times:

- plain: `DiffusionModel.sample` in this process (what `minidiffusion sample` spends sampling);
- served: `POST /api/generate` to the server, running in a child process (a browser is another
  process too), a PNG preview of every image after every step streamed back, then the images, the
  grid and the .npz in the `done` event;
- served, 2 previews: the same with `preview_every` = steps (the first and the last step only), which
  isolates what the per-step previews cost from the request and the final files.

The overhead is the median over the repeats of served / plain - 1, each pair timed one after the
other (a busy machine slows both alike; the quartiles show how much it still moves). Three numbers
move less with the machine's load: the previews' own cost, the seconds each served job spent making
its previews (the `done` event's `preview_seconds`: decoding and PNGs) against the rest of that same
job; what the request and the stream add (the seconds the client waits less the job's own, the
`done` event's `seconds`: HTTP, JSON, the final PNGs, grid and .npz sent as data URLs); and, with
`--server thread --threads 1` (the server in this process, one torch thread, so no thread spins
while it waits), the CPU overhead: this process's CPU seconds (sampling, server and client
together) served against plain.

Prints a markdown table and writes JSON:

    python benchmarks/serve_overhead.py --n 1 4 16 --steps 20 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import httpx
import torch

from minidiffusion.device import resolve_device, resolve_precision, synchronize
from minidiffusion.pipelines.image import DiffusionModel
from minidiffusion.serve.server import BackgroundServer, build_app


def client() -> httpx.Client:
    """Return an HTTP client that sends each request at once (TCP_NODELAY, as browsers do)."""
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    return httpx.Client(timeout=600, transport=httpx.HTTPTransport(socket_options=nodelay))


def _served(url: str, settings: dict, http: httpx.Client | None = None) -> dict:
    """Return {seconds, cpu, first_preview, previews, done} for one request: the seconds to the `done` event and
    to the first preview, timed by the client, this process's CPU seconds, and the `done` event itself."""
    http = http or client()
    start, cpu, first, previews, event = time.perf_counter(), time.process_time(), None, 0, None
    with http.stream("POST", url + "/api/generate", json=settings) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                if event == "preview":
                    previews += 1
                    first = first if first is not None else time.perf_counter() - start
            elif line.startswith("data:") and event in ("done", "error"):
                data = json.loads(line[5:])
                if event == "error":
                    raise RuntimeError(f"the server failed: {data['message']}")
                return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                        "first_preview": first, "previews": previews, "done": data}
    raise RuntimeError("the stream ended without a done event")


def _serve_in_child(model, name: str, urls, stop, threads: int) -> None:
    """The server process: serve `model` with `threads` torch threads (the parent's: plain and served sample
    alike) on a free loopback port, put its URL on `urls`, run until `stop`; return None."""
    torch.set_num_threads(threads)
    with BackgroundServer(build_app({name: lambda: model})) as url:
        urls.put(url)
        stop.wait()


@contextlib.contextmanager
def serving(model, name: str, where: str = "process"):
    """Yield the URL of a server for `model`: in a child process (as a browser would be a client from another
    process) or in a thread of this one (`where="thread"`, for tests)."""
    if where == "thread":
        with BackgroundServer(build_app({name: lambda: model})) as url:
            yield url
        return
    ctx = multiprocessing.get_context("spawn")
    urls, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_serve_in_child, args=(model, name, urls, stop, torch.get_num_threads()),
                        daemon=True)
    child.start()
    try:
        yield urls.get(timeout=300)
    finally:
        stop.set()
        child.join(30)


def run(model: DiffusionModel, ns: list[int], steps: int, repeats: int, precision: str = "auto",
        name: str = "model", where: str = "process") -> dict:
    """Return {"rows": [one per n: medians of plain, served, served with 2 previews, first preview, overheads]}."""
    precision = resolve_precision(precision, model.device)
    labels = [0] if model.cfg.model.n_classes else None
    rows = []
    with serving(model, name, where) as url, client() as http:
        base = {"model": name, "steps": steps, "seed": 0, "precision": precision, "sampler": model.cfg.sampler}
        if labels:
            base["label"] = labels[0]
        _served(url, {**base, "n": 1, "steps": 2}, http)  # warm-up: the model loads, the first call's costs
        for n in ns:
            m: dict[str, list[float]] = {k: [] for k in ("plain", "plain_cpu", "served", "served_cpu", "minimal",
                                                          "first", "job", "previews")}
            for _ in range(repeats):
                t, c = time.perf_counter(), time.process_time()
                model.sample(n, steps=steps, labels=labels, seed=0, precision=precision)
                synchronize(model.device)
                m["plain"].append(time.perf_counter() - t)
                m["plain_cpu"].append(time.process_time() - c)
                every = _served(url, {**base, "n": n, "preview_every": 1}, http)
                assert every["previews"] == steps, (every["previews"], steps)
                m["served"].append(every["seconds"])
                m["served_cpu"].append(every["cpu"])
                m["first"].append(every["first_preview"])
                m["job"].append(every["done"]["seconds"])
                m["previews"].append(every["done"]["preview_seconds"])
                m["minimal"].append(_served(url, {**base, "n": n, "preview_every": steps}, http)["seconds"])
            med = {k: statistics.median(v) for k, v in m.items()}
            paired = [100 * (e - p) / p for e, p in zip(m["served"], m["plain"], strict=True)]  # neighbours in time
            cpu = [100 * (e - p) / p for e, p in zip(m["served_cpu"], m["plain_cpu"], strict=True)]
            # in-run cost: the seconds this job's previews took (decode + PNG) against the rest of the same job
            in_run = [100 * pv / (job - pv) for pv, job in zip(m["previews"], m["job"], strict=True)]
            rows.append({"n": n, "plain_s": round(med["plain"], 4), "served_s": round(med["served"], 4),
                         "served_2_previews_s": round(med["minimal"], 4), "first_preview_s": round(med["first"], 4),
                         "overhead_pct": round(statistics.median(paired), 1),
                         "overhead_quartiles_pct": [round(q, 1) for q in statistics.quantiles(paired, n=4)[::2]]
                         if len(paired) > 1 else [round(paired[0], 1)] * 2,
                         # with the server in this process: every thread's CPU seconds (sampling, server, client)
                         "cpu_overhead_pct": round(statistics.median(cpu), 1) if where == "thread" else None,
                         "previews_in_run_pct": round(statistics.median(in_run), 2),
                         "preview_ms_per_step": round(1000 * med["previews"] / steps, 3),
                         # the request, the stream and the final files: the client's seconds less the job's own
                         "transport_ms": round(1000 * statistics.median(
                             s - j for s, j in zip(m["served"], m["job"], strict=True)), 1)})
    return {"steps": steps, "repeats": repeats, "precision": precision, "sampler": model.cfg.sampler,
            "server": where, "rows": rows}


def markdown(result: dict) -> str:
    """Return the result as a markdown table."""
    lines = [f"{result['steps']} steps, {result['sampler']}, {result['precision']}, medians of {result['repeats']} "
             f"(server in a {result['server']})", "",
             "| images | plain sample | served, a preview every step | served, 2 previews | first preview | "
             "overhead (quartiles) | CPU overhead | previews' own cost (in the run) | request and stream |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lo, hi = r["overhead_quartiles_pct"]
        lines.append(f"| {r['n']} | {r['plain_s']:.3f} s | {r['served_s']:.3f} s | {r['served_2_previews_s']:.3f} s | "
                     f"{r['first_preview_s']:.3f} s | {r['overhead_pct']:+.1f}% ({lo:+.1f}..{hi:+.1f}) | "
                     + ("n/a | " if r["cpu_overhead_pct"] is None else f"{r['cpu_overhead_pct']:+.1f}% | ") +
                     f"{r['previews_in_run_pct']:.2f}% ({r['preview_ms_per_step']:.2f} ms a step) | "
                     f"{r['transport_ms']:.0f} ms |")
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run the benchmark, print its table and write its JSON; return None."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", default="fmnist")
    p.add_argument("--n", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--server", choices=["process", "thread"], default="process",
                   help="run the server in a child process (default) or in a thread of this one")
    p.add_argument("--json", default="benchmarks/results/serve_overhead.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = DiffusionModel.from_pretrained(args.pretrained, device=device)
    result = run(model, args.n, args.steps, args.repeats, args.precision, args.pretrained, args.server)
    print(markdown(result))
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": torch.get_num_threads(),
           "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__, "device": str(device),
           "model": args.pretrained, **result}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
