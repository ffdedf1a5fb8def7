"""Diffusion on spectrograms: the instruments image set, its training data, sampling to sound (WAVs, grid, an HTML
page of players), the per-class accuracy of the audio feature network, and train -> sample -> eval on the command
line at tiny settings.

Tests that need Debian's sound font and FluidSynth FAIL (never skip) when they are missing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from minidiffusion.cli import main
from minidiffusion.config import apply_overrides
from minidiffusion.data.audio import write_wav
from minidiffusion.data.images import uint8_to_float
from minidiffusion.data.instruments import CLASS_NAMES
from minidiffusion.data.sets import is_audio_folder, load_image_set
from minidiffusion.data.spectrogram import SpectrogramConfig, wave_to_image
from minidiffusion.errors import ConfigError, DataError
from minidiffusion.metrics.evaluate import class_accuracy, evaluate_model
from minidiffusion.metrics.features import ClassifierFeatures, load_feature_network
from minidiffusion.nn.resnet import ResNet, ResNetConfig
from minidiffusion.nn.unet import UNet
from minidiffusion.pipelines.audio import audio_paths, sample_audio_to_files, write_audio_samples, writes_audio
from minidiffusion.pipelines.image import DiffusionModel
from minidiffusion.recipes.diffusion import DiffusionConfig, load_training_data

SPEC = SpectrogramConfig()
TINY_UNET = ["model.channels=[8, 16]", "model.blocks=[1, 1]", "model.attention=[false, false]", "model.mid_blocks=1",
             "model.head_dim=8", "model.norm_groups=4", "model.emb_dim=32"]


def _instruments(split: str = "train", limit: int = 20):
    """The first `limit` clips of the instruments set as spectrogram images; FAILS when the font or synth is missing."""
    try:
        return load_image_set("instruments", split, limit=limit)
    except DataError as e:
        pytest.fail(f"the instruments set needs FluidSynth and the GM sound font (`apt-get install libfluidsynth3 "
                    f"fluid-soundfont-gm`): {e}", pytrace=False)


def _tiny_model(data: str = "instruments") -> DiffusionModel:
    cfg = apply_overrides(DiffusionConfig(), [*TINY_UNET, f"data={data}", "image_size=128", "model.in_channels=1",
                                              "model.n_classes=10", "objective=edm", "sampler=dpmpp_2m", "steps=2"])
    torch.manual_seed(0)
    return DiffusionModel(UNet(cfg.model), cfg, list(CLASS_NAMES))


def test_the_instruments_set_is_balanced_spectrograms_and_cached(monkeypatch):
    s = _instruments(limit=20)
    assert s.images.shape == (20, 1, 128, 128) and s.images.dtype == torch.uint8
    assert s.labels.tolist() == list(range(10)) * 2 and s.class_names == list(CLASS_NAMES)
    assert s.class_names[0] == "piano"
    x = uint8_to_float(s.images)
    assert -1 <= x.min() < -0.9 and 0.9 < x.max() <= 1  # silence at -1, each clip's loudest bin near the top
    from minidiffusion.data import instruments

    def no_render(*a, **k):
        raise AssertionError("a second load must come from the image cache")

    monkeypatch.setattr(instruments, "load_instruments", no_render)
    again = load_image_set("instruments", "train", limit=20)
    assert torch.equal(again.images, s.images) and torch.equal(again.labels, s.labels)
    assert len(load_image_set("instruments", "train", limit=13)) == 13  # a limit that is no multiple of 10


def test_training_data_of_the_instruments_are_one_channel_128(tmp_path):
    _instruments(limit=20)
    _instruments("test", limit=10)
    cfg = apply_overrides(DiffusionConfig(), ["data=instruments", "train_limit=20", "valid_limit=10", "batch_size=8"])
    td = load_training_data(cfg)
    assert (td.channels, td.image_size, td.data, td.class_names) == (1, 128, "instruments", list(CLASS_NAMES))
    xb, yb = next(iter(td.dls.train))
    assert xb.shape == (8, 1, 128, 128) and xb.dtype == torch.float32 and -1 <= xb.min() and xb.max() <= 1
    assert yb.dtype == torch.int64 and td.dls.valid.n == 10


def _note(f: float, seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * f * t) * np.exp(-3 * t)).astype(np.float32)


def test_a_folder_of_sound_files_loads_as_spectrograms(tmp_path):
    for name, f in (("high", 2000.0), ("low", 200.0)):
        (tmp_path / name).mkdir()
        for i in range(2):
            write_wav(tmp_path / name / f"{i}.wav", _note(f * (1 + i / 10)), 16000)
    assert is_audio_folder(tmp_path) and not is_audio_folder(tmp_path / "nothing")
    s = load_image_set(str(tmp_path))
    assert s.images.shape == (4, 1, 128, 128) and s.class_names == ["high", "low"]
    assert s.labels.tolist() == [0, 0, 1, 1]
    x = uint8_to_float(s.images)
    row = x.mean(dim=(1, 3)).argmax(1)  # [N]: the loudest row; rows run from high (top) to low pitches (bottom)
    assert (row[:2] < row[2:]).all()  # 2 kHz sits above 200 Hz
    with pytest.raises(ConfigError, match="no test split"):
        load_image_set(str(tmp_path), "test")


def test_audio_paths_name_every_file_from_out(tmp_path):
    one = audio_paths(tmp_path / "piano.wav", 1)
    assert one["wavs"] == [tmp_path / "piano.wav"] and one["grid"] == tmp_path / "piano.png"
    assert one["html"] == tmp_path / "piano.html"
    three = audio_paths(tmp_path / "s.png", 3)
    assert [p.name for p in three["wavs"]] == ["s-0.wav", "s-1.wav", "s-2.wav"] and three["grid"].name == "s.png"
    assert [p.name for p in audio_paths(tmp_path / "s", 2)["wavs"]] == ["s-0.wav", "s-1.wav"]
    with pytest.raises(ConfigError, match="ending in .wav"):
        audio_paths(tmp_path / "s.mp3", 2)


def test_spectrograms_become_wavs_a_grid_and_a_page(tmp_path):
    s = _instruments(limit=2)
    images = uint8_to_float(s.images)
    out = write_audio_samples(images, s.labels, tmp_path / "clips.wav", s.class_names, n_iter=16)
    assert [p.split("/")[-1] for p in out["wavs"]] == ["clips-0.wav", "clips-1.wav"]
    assert out["sample_rate"] == 16000 and out["griffin_lim_seconds"] >= 0
    for path, image in zip(out["wavs"], images, strict=True):
        wave, rate = sf.read(path, dtype="float32")
        assert rate == 16000 and wave.shape == (SPEC.samples,) and 0.05 < np.abs(wave).max() <= 1
        again = wave_to_image(torch.from_numpy(wave))[0]  # the sound's spectrogram is the image it came from
        assert (again - image).abs().mean() < 0.1
    page = (tmp_path / "clips.html").read_text()
    assert page.count("<audio controls") == 2 and 'src="clips-0.wav"' in page and "piano" in page
    assert page.count("data:image/png;base64,") == 2 and 'href="clips.png"' in page  # plays offline
    assert (tmp_path / "clips.png").stat().st_size > 0


def test_sound_is_refused_for_images_that_are_no_spectrograms(tmp_path):
    with pytest.raises(ConfigError, match=r"spectrogram images \[N, 1, 128, 128\], got \[2, 3, 32, 32\]"):
        write_audio_samples(torch.zeros(2, 3, 32, 32), None, tmp_path / "x.wav")
    with pytest.raises(ConfigError, match="at least one image"):
        write_audio_samples(torch.zeros(0, 1, 128, 128), None, tmp_path / "x.wav")
    fmnist = _tiny_model(data="fashion-mnist")
    fmnist.cfg.image_size = 32
    assert not writes_audio(fmnist, tmp_path / "x.png") and writes_audio(fmnist, tmp_path / "x.wav")
    with pytest.raises(ConfigError, match="give --out a .png"):
        sample_audio_to_files(fmnist, tmp_path / "x.wav", n=1)
    assert list(tmp_path.iterdir()) == []


def test_a_spectrogram_model_samples_to_sound(tmp_path):
    model = _tiny_model()
    assert writes_audio(model, tmp_path / "x.png")
    out = sample_audio_to_files(model, tmp_path / "s.wav", n=2, labels=["piano", "organ"], seed=1, n_iter=4)
    assert out["labels"] == ["piano", "organ"] and out["n"] == 2 and out["steps"] == 2
    assert out["nfe"] == model.nfe("dpmpp_2m", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-0.wav", "s-1.wav", "s.html", "s.png"]
    assert sf.info(str(tmp_path / "s-0.wav")).frames == SPEC.samples
    with pytest.raises(ConfigError, match="unknown label 'kazoo'"):
        sample_audio_to_files(model, tmp_path / "k.wav", n=1, labels=["kazoo"])


class _MeanBandNet(torch.nn.Module):
    """Logits that say class 0 when the image is bright, class 1 when it is dark: a known classifier."""

    cfg = ResNetConfig(in_channels=1, n_classes=2, channels=(8, 16), blocks=(1,), image_size=128)

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m], 1)

    def features(self, x):
        return x.mean(dim=(2, 3))


def test_class_accuracy_counts_each_requested_class():
    net = ClassifierFeatures(_MeanBandNet(), allow_unusual=True)
    images = torch.cat([torch.full((3, 1, 128, 128), 0.5), torch.full((2, 1, 128, 128), -0.5)])
    images[:, :, 0, 0] = torch.tensor([-1.0, -1, -1, 1, 1])[:, None]  # the range guard wants some spread
    labels = torch.tensor([0, 0, 1, 1, 0])
    out = class_accuracy(net, images, labels, ["bright", "dark"], batch_size=2)
    assert out == {"accuracy": 0.6, "class_accuracy": {"bright": round(2 / 3, 4), "dark": 0.5}}
    assert ResNet  # the real feature network is a ResNet with this interface


@pytest.mark.integration
def test_train_sample_and_eval_a_tiny_spectrogram_model(tmp_path, capsys):
    _instruments(limit=20)
    _instruments("test", limit=10)
    run, clf = str(tmp_path / "run"), str(tmp_path / "clf")
    assert main(["train", "instruments", "--quiet", "--out", run, "epochs=1", "train_limit=20", "valid_limit=10",
                 "batch_size=10", "device=cpu", "precision=fp32", *TINY_UNET]) == 0
    capsys.readouterr()
    assert main(["sample", run, "--label", "piano", "--n", "1", "--steps", "2", "--out",
                 str(tmp_path / "piano.wav")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["labels"] == ["piano"] and line["wavs"] == [str(tmp_path / "piano.wav")]
    assert sf.info(str(tmp_path / "piano.wav")).samplerate == 16000 and (tmp_path / "piano.html").is_file()
    assert main(["train", "instruments-classifier", "--quiet", "--out", clf, "epochs=1", "train_limit=20",
                 "batch_size=10", "device=cpu", "precision=fp32", "model.channels=[4, 8]", "model.blocks=[1]",
                 "stem_init=kaiming"]) == 0
    capsys.readouterr()
    features = load_feature_network(clf, allow_unusual=True)  # a one-epoch model's samples are nearly flat
    assert features.image_shape == (1, 128, 128) and features.model.cfg.n_classes == 10
    ev = evaluate_model(DiffusionModel.from_run(run), n=10, steps=2, feature_net=features)
    assert ev["data"] == "instruments" and ev["n"] == 10 and np.isfinite(ev["fid"]) and np.isfinite(ev["fid_reals"])
    assert 0 <= ev["accuracy"] <= 1 and set(ev["class_accuracy"]) == set(CLASS_NAMES)
