"""Training state as plain data: nested state dicts split into tensors + JSON, RNG capture.

A checkpoint must hold model, optimizer, scheduler, EMA, metrics and RNG state without
pickle. `flatten_state` walks any nest of dicts/lists/tuples and pulls every tensor out
into a flat `{key: tensor}` dict (for safetensors), leaving a JSON-able skeleton where
each tensor is `{"__tensor__": key}`. Tuples and dicts with non-string keys (the
optimizer's `state` is keyed by int) get small markers so they come back as they were:
`unflatten_state(skeleton, tensors)` returns an equal structure.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

from ..artifacts import check_state_dict
from ..errors import CheckpointError

__all__ = ["flatten_state", "unflatten_state", "capture_rng", "restore_rng", "check_state_dict"]

_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


def _join(prefix: str, key: object) -> str:
    return f"{prefix}/{key}" if prefix else str(key)


def flatten_state(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Return (tensors, skeleton): every tensor of `tree` keyed by its path, and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            if key in tensors:
                raise CheckpointError(f"two tensors of the training state map to the same key {key!r}")
            tensors[key] = x
            return {_TENSOR: key}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, _join(key, k)) for k, v in x.items()}
            return {_DICT: [[enc(k, _join(key, f"key{i}")), enc(v, _join(key, k))]
                            for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, tuple):
            return {_TUPLE: [enc(v, _join(key, i)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, _join(key, i)) for i, v in enumerate(x)]
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise CheckpointError(f"cannot store a {type(x).__name__} at {key or 'the root'!r} in a checkpoint: "
                              "only tensors, numbers, strings, lists, tuples and dicts are saved (never "
                              "pickles); make that callback's state_dict() return plain data")

    return tensors, enc(tree, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Return the structure `flatten_state` split into `skeleton` and `tensors`."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if _TENSOR in x:
            if x[_TENSOR] not in tensors:
                raise CheckpointError(f"checkpoint metadata refers to tensor {x[_TENSOR]!r}, which its "
                                      "safetensors file lacks; the checkpoint is damaged, use an older one")
            return tensors[x[_TENSOR]]
        if _TUPLE in x:
            return tuple(dec(v) for v in x[_TUPLE])
        if _DICT in x:
            return {dec(k): dec(v) for k, v in x[_DICT]}
        return {k: dec(v) for k, v in x.items()}

    return dec(skeleton)


def capture_rng() -> dict:
    """Return the states of python `random`, numpy's global RNG, torch CPU and every CUDA device."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set every RNG back to `state` (from `capture_rng`); warns when the CUDA device count differs."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None or torch.cuda.is_available():
        n_now = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cuda is not None and len(cuda) == n_now:
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda or [])} device(s), this machine has "
                          f"{n_now}: CUDA random numbers will differ from the original run", stacklevel=2)
