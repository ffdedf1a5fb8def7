"""Checkpoint format, atomic writes, refusal of pickles, key checks, and in-process resume."""

from __future__ import annotations

import json
import random
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import minidiffusion.learner.checkpoint as ckpt_mod
from minidiffusion.errors import CheckpointError, ConfigError
from minidiffusion.learner import (
    EMACB,
    BatchTransformCB,
    CancelFitException,
    CheckpointCB,
    Learner,
    MetricsCB,
    OneCycleCB,
    ProgressCB,
    capture_rng,
    check_state_dict,
    flatten_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    restore_rng,
    save_checkpoint,
    unflatten_state,
)
from test_learner_helpers import RaiseAt, assert_same_weights, mlp, regression_dls, weights


def test_flatten_round_trip_keeps_tuples_int_keys_and_tensors():
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    tree = {"a": (1, 2.5, "x", None, True), "opt": {0: {"step": torch.tensor(3.0)}, 1: [torch.ones(2)]},
            "__odd": [torch.zeros(1, 2)], "groups": opt.state_dict()["param_groups"]}
    tensors, skel = flatten_state(tree)
    assert set(tensors) == {"opt/0/step", "opt/1/0", "__odd/0"}
    back = unflatten_state(json.loads(json.dumps(skel)), tensors)
    assert back["a"] == (1, 2.5, "x", None, True)
    assert list(back["opt"]) == [0, 1] and torch.equal(back["opt"][0]["step"], torch.tensor(3.0))
    assert back["groups"] == tree["groups"] and isinstance(back["groups"][0]["betas"], tuple)
    with pytest.raises(CheckpointError, match="cannot store a object"):
        flatten_state({"f": object()})


def test_rng_capture_restore_repeats_all_generators():
    state = capture_rng()
    tensors, skel = flatten_state(state)
    first = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(unflatten_state(json.loads(json.dumps(skel)), tensors))
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_save_load_round_trip_with_tied_weights(tmp_path):
    shared = torch.arange(6.0).reshape(2, 3)
    tensors = {"a": shared, "b": shared, "view": shared[0], "empty": torch.zeros(0)}
    path = save_checkpoint(tmp_path / "ckpt-000001-e0000-i000000", tensors, {"epoch": 1})
    loaded, meta = load_checkpoint(path)
    assert meta["epoch"] == 1 and set(meta["files"]) == {"state.safetensors"}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert not list(tmp_path.glob(".*"))  # no staging directory left behind


def test_pickle_files_are_refused_with_a_reason(tmp_path):
    for name in ("model.pt", "model.pth", "data.pkl", "pytorch_model.bin"):
        (tmp_path / name).write_bytes(b"\x80\x04not really")
        with pytest.raises(CheckpointError, match="pickle.*execute arbitrary code.*safetensors"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path)  # a directory holding only pickles
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing")


def test_key_and_shape_mismatches_are_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    got = {k: v for k, v in model.state_dict().items() if k != "1.bias"}
    got["0.weight"] = torch.zeros(5, 3)
    got["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        check_state_dict(model.state_dict(), got, "checkpoint X")
    msg = str(e.value)
    assert "missing keys: 1.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "0.weight (5, 3) vs (4, 3)" in msg


def test_load_weights_from_a_safetensors_file_checks_shapes(tmp_path):
    from safetensors.torch import save_file

    src = nn.Linear(3, 2)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    dst = load_weights(nn.Linear(3, 2), tmp_path / "w.safetensors")
    assert torch.equal(dst.weight, src.weight)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_weights(nn.Linear(3, 5), tmp_path / "w.safetensors")


def _learner(path, cbs=(), dropout=0.0) -> Learner:
    return Learner(mlp(dropout), regression_dls(n_train=32, bs=8), lr=1e-3, path=path,
                   opt_func=partial(torch.optim.AdamW, eps=1e-5), cbs=list(cbs))


def test_checkpoint_cb_saves_each_epoch_and_every_n_steps_keeping_the_newest(tmp_path):
    cb = CheckpointCB(every_n_steps=3, keep=2)
    _learner(tmp_path, [cb]).fit(2)  # 4 batches per epoch: steps 3, 6 and epoch ends at steps 4, 8
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["ckpt-000003-e0001-i000002", "ckpt-000004-e0002-i000000"]  # step 6 = epoch 1, iter 1
    _, meta = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert (meta["epoch"], meta["iter"], meta["step"]) == (2, 0, 8)
    with pytest.raises(ConfigError, match="needs a directory"):
        Learner(mlp(), regression_dls(), cbs=[CheckpointCB()]).fit(1)


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    learn = _learner(tmp_path, [CheckpointCB(keep=2)])
    learn.fit(1)
    good = latest_checkpoint(tmp_path / "checkpoints")

    def crash(tensors, filename, metadata=None):  # the disk fills up half-way through the tensors file
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_safetensors", crash)
    with pytest.raises(OSError, match="No space"):
        learn.fit(1)
    assert latest_checkpoint(tmp_path / "checkpoints") == good
    tensors, meta = load_checkpoint(good)
    assert meta["epoch"] == 1 and tensors


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    _learner(tmp_path, [CheckpointCB(keep=2)]).fit(2)
    old, new = list_checkpoints(tmp_path / "checkpoints")
    data = bytearray((new / "state.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    (new / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(new)
    (old.parent / ".ckpt-000009-e0009-i000000.tmp-1").mkdir()  # a stale staging dir is ignored
    learn = _learner(tmp_path, [CheckpointCB(keep=2)])
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        learn.fit(2, resume=True, cbs=[RaiseAt("before_batch", CancelFitException, at=(1, 0))])
    assert learn.start_epoch == 1 and learn.epoch == 1 and learn.step == 4
    (old / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"), pytest.warns(UserWarning):
        _learner(tmp_path, [CheckpointCB(keep=2)]).fit(2, resume=True)


def test_resume_into_a_different_model_names_the_mismatch(tmp_path):
    _learner(tmp_path, [CheckpointCB()]).fit(1)
    narrow = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    other = Learner(narrow, regression_dls(), path=tmp_path, cbs=[CheckpointCB()])
    with pytest.raises(CheckpointError, match=r"shape mismatches.*0\.weight \(16, 3\) vs \(8, 3\)"):
        other.fit(2, resume=True)


def _full_run(path, interrupt_at=None, resume=False):
    cbs = [BatchTransformCB(lambda x: x + 0.1 * torch.randn_like(x)), MetricsCB(), ProgressCB(plot=False),
           OneCycleCB(max_lr=1e-2), EMACB(decay=0.9), CheckpointCB(every_n_steps=3, keep=2)]
    learn = _learner(path, cbs, dropout=0.2)
    extra = [RaiseAt("before_batch", CancelFitException, at=interrupt_at)] if interrupt_at else []
    learn.fit(3, resume=resume, cbs=extra)
    return learn


@pytest.mark.parametrize("interrupt_at", [(1, 2), (2, 0)], ids=["mid-epoch", "epoch-boundary"])
def test_in_process_resume_matches_uninterrupted_run(tmp_path, interrupt_at, capsys):
    ref = _full_run(tmp_path / "ref")
    _full_run(tmp_path / "run", interrupt_at=interrupt_at)
    torch.manual_seed(123)  # the resumed run must not depend on the RNG state before it
    resumed = _full_run(tmp_path / "run", resume=True)
    assert "resumed from" in capsys.readouterr().out
    assert_same_weights(weights(ref.model), weights(resumed.model))
    assert_same_weights(weights(ref.cb(EMACB).ema_model), weights(resumed.cb(EMACB).ema_model))
    assert resumed.cb(MetricsCB).history == ref.cb(MetricsCB).history
    assert resumed.cb(ProgressCB).train_log == ref.cb(ProgressCB).train_log
    final = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert_same_weights(weights(load_weights(mlp(), final, ema=True)), weights(ref.cb(EMACB).ema_model))


def test_resume_without_rng_restore_would_differ(tmp_path, monkeypatch):
    """Control for the test above: dropout and augmentation really depend on the restored RNG."""
    ref = _full_run(tmp_path / "ref")
    _full_run(tmp_path / "run", interrupt_at=(1, 2))
    monkeypatch.setattr(ckpt_mod, "restore_rng", lambda state: None)
    resumed = _full_run(tmp_path / "run", resume=True)
    assert not torch.equal(ref.model[0].weight, resumed.model[0].weight)

