"""The FID feature network: the [-1, 1] input guard, batched extraction, the reference cache, loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from minidiffusion.config import save_config
from minidiffusion.errors import CheckpointError
from minidiffusion.metrics.features import (
    ClassifierFeatures,
    default_stats_dir,
    extract_features,
    load_feature_network,
    reference_stats,
)
from minidiffusion.nn.resnet import ResNet, ResNetConfig
from minidiffusion.recipes.classifier import ClassifierConfig

TINY = ResNetConfig(channels=(8, 16), blocks=(1,))


def tiny_resnet(seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(TINY)


def images(n: int, seed: int = 0) -> torch.Tensor:
    """n float32 images [n, 1, 32, 32] spanning [-1, 1] (background -1, like Fashion-MNIST)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
    x[..., :4, :] = -1
    return x


@pytest.fixture
def extractor() -> ClassifierFeatures:
    return ClassifierFeatures(tiny_resnet())


class Counting(nn.Module):
    """A feature extractor that counts its forward passes (any nn.Module returning [N, D] is one)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


# -- the input contract -----------------------------------------------------------------------
def test_features_have_shape_n_by_d_and_do_not_depend_on_the_batch(extractor):
    x = images(6)
    feats = extractor(x)
    assert feats.shape == (6, 16) and feats.dtype == torch.float32
    torch.testing.assert_close(extractor(x[:2]), feats[:2], rtol=1e-5, atol=1e-6)  # BatchNorm in eval mode


def test_wrapper_stays_in_eval_mode(extractor):
    extractor.train()
    assert not extractor.training and not extractor.model.training
    assert not any(m.training for m in extractor.modules())


@pytest.mark.parametrize("bad,match", [
    (images(4) * 0.5 + 0.5, r"looks like \[0, 1\] images"),  # forgot x*2-1
    (images(4) * 0.5, r"looks like \[-0.5, 0.5\] images"),  # the course's FID bug
])
def test_range_guard_rejects_forgotten_rescales_unless_allowed(extractor, bad, match):
    with pytest.raises(ValueError, match=match):
        extractor(bad)
    extractor.allow_unusual = True
    assert extractor(bad).shape == (4, 16)
    assert ClassifierFeatures(tiny_resnet(), allow_unusual=True)(bad).shape == (4, 16)


def test_values_outside_the_range_are_rejected_even_when_unusual_is_allowed():
    with pytest.raises(ValueError, match=r"outside \[-1, 1\]"):
        ClassifierFeatures(tiny_resnet(), allow_unusual=True)(images(2) * 127.5 + 127.5)


def test_uint8_and_other_dtypes_are_rejected_with_the_fix(extractor):
    with pytest.raises(ValueError, match="uint8 pixels.*uint8_to_float"):
        extractor(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="float32.*float64"):
        extractor(images(2).double())


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 64, 64), (1, 32, 32)])
def test_wrong_shapes_point_to_a_custom_extractor(extractor, shape):
    with pytest.raises(ValueError, match=r"not 1x32x32 need your own feature extractor.*\[N, D\]"):
        extractor(torch.rand(shape) * 2 - 1)


def test_28x28_images_get_the_padding_hint(extractor):
    with pytest.raises(ValueError, match=r"pad_to\(x, 32\)"):
        extractor(images(2)[..., 2:30, 2:30])


# -- extract_features ---------------------------------------------------------------------------
def test_extract_features_batches_and_returns_float64_cpu(extractor):
    x = images(7)
    feats = extract_features(extractor, x, batch_size=3)
    assert feats.shape == (7, 16) and feats.dtype == torch.float64 and feats.device.type == "cpu"
    torch.testing.assert_close(feats, extractor(x).double(), rtol=1e-5, atol=1e-6)


def test_extract_features_uses_eval_mode_and_restores_the_mode():
    net = Counting(nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(1024, 5)))
    net.train()
    x = images(4)
    a, b = extract_features(net, x), extract_features(net, x)
    assert torch.equal(a, b) and net.training and net.calls == 2  # dropout was off, mode restored


def test_extract_features_rejects_extractors_that_do_not_return_n_by_d():
    with pytest.raises(ValueError, match=r"must return features \[N, D\]"):
        extract_features(nn.Identity(), images(3))


# -- reference_stats cache -------------------------------------------------------------------------
def test_reference_stats_second_call_runs_no_forward_pass(tmp_path):
    counting = Counting(ClassifierFeatures(tiny_resnet()))
    x = images(10)
    first = reference_stats(counting, x, cache_dir=tmp_path, name="tiny", batch_size=4)
    assert counting.calls == 3 and first.n == 10 and first.features.shape == (10, 16)
    second = reference_stats(counting, x, cache_dir=tmp_path, name="tiny", batch_size=4)
    assert counting.calls == 3  # served from the cache file
    assert second.key == first.key
    for name in ("mu", "sigma", "features"):
        assert torch.equal(getattr(second, name), getattr(first, name))
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-n10-{first.key[:16]}.safetensors"]


def test_reference_stats_key_depends_on_network_images_and_name(tmp_path):
    x = images(8)
    base = reference_stats(ClassifierFeatures(tiny_resnet(0)), x, cache_dir=tmp_path, name="a")
    other_net = reference_stats(ClassifierFeatures(tiny_resnet(1)), x, cache_dir=tmp_path, name="a")
    other_images = reference_stats(ClassifierFeatures(tiny_resnet(0)), images(8, seed=1), cache_dir=tmp_path,
                                   name="a")
    other_name = reference_stats(ClassifierFeatures(tiny_resnet(0)), x, cache_dir=tmp_path, name="b")
    keys = {s.key for s in (base, other_net, other_images, other_name)}
    assert len(keys) == 4 and len(list(tmp_path.iterdir())) == 4
    assert not torch.equal(base.mu, other_net.mu)


def test_reference_stats_default_cache_respects_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_stats_dir() == tmp_path / "minidiffusion" / "fid"
    stats = reference_stats(ClassifierFeatures(tiny_resnet()), images(4))
    assert (tmp_path / "minidiffusion" / "fid" / f"fmnist-test-n4-{stats.key[:16]}.safetensors").is_file()


def test_damaged_cache_file_is_recomputed(tmp_path):
    counting = Counting(ClassifierFeatures(tiny_resnet()))
    stats = reference_stats(counting, images(4), cache_dir=tmp_path, name="tiny")
    path = next(tmp_path.iterdir())
    path.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="recomputing reference stats"):
        again = reference_stats(counting, images(4), cache_dir=tmp_path, name="tiny")
    assert counting.calls == 2 and torch.equal(again.mu, stats.mu)
    with pytest.raises(ValueError, match="names a file"):
        reference_stats(counting, images(4), cache_dir=tmp_path, name="../escape")


# -- load_feature_network ---------------------------------------------------------------------------
def save_tiny_classifier(folder, weights_name: str, config_name: str, seed: int = 0) -> ResNet:
    model = tiny_resnet(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / weights_name))
    save_config(ClassifierConfig(model=TINY), folder / config_name)
    return model.eval()


@pytest.mark.parametrize("names,point_at", [
    (("classifier.safetensors", "classifier.toml"), "file"),  # the shipped pair's layout
    (("classifier.safetensors", "classifier.toml"), "folder"),
    (("model.safetensors", "config.toml"), "folder"),  # a train-classifier run directory
    (("model.safetensors", "config.toml"), "file"),
])
def test_load_feature_network_from_a_saved_classifier(tmp_path, names, point_at):
    model = save_tiny_classifier(tmp_path, *names, seed=5)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    net = load_feature_network(tmp_path / names[0] if point_at == "file" else tmp_path)
    assert torch.equal(torch.rand(3), expected_draw)  # loading left the global RNG alone
    assert isinstance(net, ClassifierFeatures) and not net.training
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.features(x))


def test_load_feature_network_missing_or_mismatched_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no feature network weights"):
        load_feature_network(tmp_path / "nothing.safetensors")
    weights = tmp_path / "lonely" / "net.safetensors"
    weights.parent.mkdir()
    save_file({"w": torch.zeros(1)}, str(weights))
    with pytest.raises(CheckpointError, match="has no config"):
        load_feature_network(weights)
    save_tiny_classifier(tmp_path / "bad", "classifier.safetensors", "classifier.toml")
    wider = ClassifierConfig(model=ResNetConfig(channels=(8, 32), blocks=(1,)))
    save_config(wider, tmp_path / "bad" / "classifier.toml")  # weights no longer fit the config
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_feature_network(tmp_path / "bad")


def test_shipped_feature_network_loads_or_says_it_is_missing():
    from importlib import resources

    shipped = resources.files("minidiffusion.assets") / "classifier.safetensors"
    if shipped.is_file():
        assert isinstance(load_feature_network(), ClassifierFeatures)
    else:
        with pytest.raises(CheckpointError, match="shipped FID feature network .* missing.*train-classifier"):
            load_feature_network()
