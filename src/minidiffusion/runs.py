"""Run directories: every training command writes its files into one, under the names below.

    config.toml       the resolved config (with `recipe = "..."` first), what `--resume` checks against
    metrics.jsonl     one JSON object per line: each epoch phase, FID scores, evaluations
    checkpoints/      the full training state (learner/checkpoint.py), for exact resume
    model.safetensors the trained component + model.toml (artifacts.py): what pipelines load
    loss.png, samples.png  pictures

A run directory is never silently reused: starting a new run where checkpoints already
exist is refused unless the caller resumes it (or replaces it, moving the old one aside).
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Any

from .config import dump_toml, from_dict, to_dict
from .errors import ConfigError, OutputError

__all__ = ["CONFIG", "METRICS", "CHECKPOINTS", "MODEL", "LOSS_PLOT", "SAMPLES", "prepare_run_dir",
           "check_same_config", "append_metrics", "read_metrics"]

CONFIG, METRICS, CHECKPOINTS = "config.toml", "metrics.jsonl", "checkpoints"
MODEL, LOSS_PLOT, SAMPLES = "model.safetensors", "loss.png", "samples.png"


def prepare_run_dir(out: str | Path, resume: bool = False, replace: bool = False, config: Any = None) -> Path:
    """Create (or, when resuming, reopen) the run directory `out`; return it as a Path.

    Refuses to start a fresh run in a directory that already holds checkpoints, so nothing
    written before is overwritten or lost; `replace=True` instead moves the old run aside to
    `OUT.prev-YYYYmmdd-HHMMSS` and starts afresh. When resuming with a `config` (a dataclass),
    it must equal the run's saved config.toml: a resumed run continues what was started.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory; choose another --out")
    if replace and not resume and out.exists():
        aside = out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        print(f"moved the previous run in {out} to {aside}")
    ckpts = out / CHECKPOINTS
    has_ckpt = ckpts.is_dir() and any(ckpts.iterdir())
    if resume and not has_ckpt:
        raise ConfigError(f"cannot resume: {out} holds no checkpoint; drop --resume to start a new run there")
    if resume and config is not None:
        check_same_config(out, config)
    if not resume and has_ckpt:
        raise ConfigError(f"{out} already holds a run (checkpoints/); pass --resume to continue it "
                          "or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the run directory {out} ({e.strerror or e}); choose another --out") from None
    return out


def check_same_config(out: str | Path, config: Any) -> None:
    """Raise ConfigError naming the keys where `config` differs from `out/config.toml` (if that exists)."""
    path = Path(out) / CONFIG
    if not path.is_file():
        return
    # Both sides go through the dataclass and TOML, so a key added to the config since the run
    # started (saved file lacks it, default applies) and TOML's own rounding are not differences.
    try:
        d = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot resume: {path} is not valid TOML ({e}); restore it or start a new run") from None
    d.pop("recipe", None)
    saved = _normalised(from_dict(type(config), d))
    now = _normalised(config)
    diffs = _differences(saved, now)
    if diffs:
        shown = "; ".join(f"{k}: run {a!r}, now {b!r}" for k, a, b in diffs[:5])
        raise ConfigError(f"cannot resume {out} with different settings ({shown}); resume with the settings "
                          f"it was started with: the same overrides, or {path} as the preset")


def _normalised(config: Any) -> dict:
    return tomllib.loads(dump_toml(to_dict(config)))


def _differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append((prefix + k, va, vb))
    return out


def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one JSON object as a line to `run_dir/metrics.jsonl` (the only writer of that file)."""
    path = Path(run_dir) / METRICS
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise OutputError(f"cannot append to {path} ({e.strerror or e}); check the run directory") from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Return the records of `run_dir/metrics.jsonl`, oldest first ([] when there is none)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
