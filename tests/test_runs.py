"""Run directories: a resumed run must continue with the settings it was started with."""

from __future__ import annotations

import json

import pytest

from minidiffusion.cli import main
from minidiffusion.config import apply_overrides, save_config
from minidiffusion.errors import ConfigError
from minidiffusion.recipes.classifier import ClassifierConfig
from minidiffusion.runs import check_same_config, prepare_run_dir


def test_check_same_config_names_every_changed_key(tmp_path):
    cfg = ClassifierConfig()
    save_config(cfg, tmp_path / "config.toml")
    check_same_config(tmp_path, ClassifierConfig())  # equal: nothing raised
    changed = apply_overrides(ClassifierConfig(), ["lr=0.02", "model.channels=[8, 16]", "model.blocks=[1]"])
    with pytest.raises(ConfigError) as e:
        check_same_config(tmp_path, changed)
    msg = str(e.value)
    assert "lr: run 0.01, now 0.02" in msg and "model.channels" in msg and "model.blocks" in msg
    assert "as the preset" in msg
    check_same_config(tmp_path / "elsewhere", changed)  # no saved config: nothing to compare


def test_prepare_run_dir_checks_the_config_only_when_resuming(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    save_config(ClassifierConfig(), run / "config.toml")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "epoch-1").mkdir()
    prepare_run_dir(run, resume=True, config=ClassifierConfig())
    with pytest.raises(ConfigError, match="epochs: run 5, now 6"):
        prepare_run_dir(run, resume=True, config=ClassifierConfig(epochs=6))


@pytest.mark.integration
def test_cli_resume_uses_the_runs_own_config_and_refuses_other_settings(tmp_path, fashion_mnist_dir, capsys):
    run = str(tmp_path / "run")
    small = ["train_limit=512", "batch_size=64", "model.channels=[4, 8]", "model.blocks=[1]", "tta=false",
             f"data={fashion_mnist_dir}", "device=cpu"]
    assert main(["train-classifier", "--quiet", "--epochs", "1", "--out", run, *small]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["train-classifier", "--quiet", "--resume", "--out", run, *small, "lr=0.5"]) == 2
    assert "lr: run 0.01, now 0.5" in capsys.readouterr().err
    assert main(["train-classifier", "--quiet", "--resume", "--out", run]) == 0  # bare: the run's settings
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["epochs"] == 1 and again["test_accuracy"] == first["test_accuracy"]  # nothing left to train


def test_check_same_config_accepts_a_run_saved_before_a_key_existed(tmp_path):
    # A run started by an older version has no line for a key added since; its default is no change.
    save_config(ClassifierConfig(), tmp_path / "config.toml")
    text = (tmp_path / "config.toml").read_text()
    assert "stem_blocks = 0" in text
    (tmp_path / "config.toml").write_text(text.replace("stem_blocks = 0\n", ""))
    check_same_config(tmp_path, ClassifierConfig())
    with pytest.raises(ConfigError, match="model.stem_blocks: run 0, now 1"):
        check_same_config(tmp_path, apply_overrides(ClassifierConfig(), ["model.stem_blocks=1"]))
