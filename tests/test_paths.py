"""Files minidiffusion writes: safetensors files get the umask's usual mode, not safetensors' 600."""

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from minidiffusion.paths import float32_state, save_safetensors, sha256_file


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_save_safetensors_follows_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = save_safetensors({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "w.safetensors",
                            metadata={"k": "v"})
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert torch.equal(load_file(path)["w"], torch.arange(6.0).reshape(2, 3))
    assert len(sha256_file(path)) == 64


def test_run_outputs_are_readable_by_others(tmp_path, umask):
    # save_model and checkpoints go through save_safetensors: a shared model stays readable.
    from minidiffusion.learner.checkpoint import save_checkpoint
    from minidiffusion.pipelines.image import DiffusionModelConfig, save_model

    umask(0o022)
    net = torch.nn.Linear(2, 2)
    weights = save_model(net, DiffusionModelConfig(), None, tmp_path / "model.safetensors")
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
    ckpt = save_checkpoint(tmp_path / "ckpt", dict(net.state_dict()), {"epoch": 0})
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in ckpt.iterdir())


def test_save_safetensors_writes_tied_weights_as_float32_state(tmp_path):
    # safetensors alone refuses tensors that share memory; model files with tied weights must save.
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2).to(torch.bfloat16))
    net[1].weight = net[0].weight
    path = save_safetensors(float32_state(net), tmp_path / "tied.safetensors")
    back = load_file(path)
    assert torch.equal(back["0.weight"], back["1.weight"]) and back["2.running_mean"].dtype == torch.float32
    assert set(back) == set(net.state_dict())
