"""serval.settings: the training, model and server configs read by pydantic, and errors that name the
setting and the file; every shipped config reads as it did with the hand-written reader."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from serval.model import SERConfig
from serval.serve.config import ServerConfig
from serval.settings import parse_yaml, read
from serval.train.config import TrainConfig, load_config, set_value

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import config_snapshot  # noqa: E402


def test_every_shipped_config_reads_as_before():
    recorded = json.loads(config_snapshot.SNAPSHOT.read_text())
    now = config_snapshot.snapshot()
    assert sorted(now) == sorted(recorded) and len(now) == len(list((ROOT / "configs").glob("*.yaml"))) + 1
    for name in recorded:
        assert now[name] == recorded[name], name
    # the snapshot records types: a float setting written as 30 in YAML is a float, a tuple a tuple
    assert recorded["configs/whisper-base-cpu.yaml"]["augment"]["snr_db"][0] == "tuple"


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim: {epochs: 2.5}\n", r"c.yaml: optim.epochs: expected an integer, got 2.5"),
        ("optim: {epochs: true}\n", r"c.yaml: optim.epochs: expected an integer, got True"),
        ("progress: 'yes'\n", r"c.yaml: progress: expected true or false, got 'yes'"),
        ("data: {train: 12}\n", r"c.yaml: data.train: expected a string, got 12"),
        ("optim: {batchsize: 4}\n", r"c.yaml: unknown setting optim.batchsize \(known: .*batch_size"),
        ("model: {lora_rank: 4}\n", r"c.yaml: unknown setting model.lora_rank \(known: .*lora_r"),
        ("augment: {snr_db: [5, x]}\n", r"c.yaml: augment.snr_db\[1\]: expected a number, got 'x'"),
        ("loss: {class_weights: 3}\n", r"c.yaml: loss.class_weights: 3 is none of"),
        ("optim: 3\n", r"c.yaml: optim: expected a mapping of settings, got 3"),
        ("optim: {warmup_ratio: 1.5}\n", r"c.yaml: optim.warmup_ratio must be in \[0, 1\)"),
        ("data: {train: m.csv, max_seconds: 45}\n", r"c.yaml: data.max_seconds must be in \(0, 30\]"),
        ("model: {lora_layers: 40}\n", r"c.yaml: model.lora_layers must be in \[0, 24\], got 40"),
        ("model: {layer_stats: true}\n", r"c.yaml: model.layer_stats needs model.layer_weighting 'weighted'"),
        (
            "select: {linear_head: true}\n",
            r"c.yaml: select.linear_head: model.linear_head needs model.layer_w",
        ),
    ],
)
def test_a_bad_training_config_names_the_setting_and_the_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text + ("" if text.startswith("data:") else "data: {train: m.csv}\n"))
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_overrides_are_checked_and_named():
    cfg = load_config(None, ["data.train=m.csv", "optim.lr_head=5e-5", "augment.snr_db=[1, 2]"])
    assert cfg.optim.lr_head == pytest.approx(5e-5) and isinstance(cfg.optim.lr_head, float)
    assert cfg.augment.snr_db == (1.0, 2.0) and isinstance(cfg.augment.snr_db, tuple)
    with pytest.raises(ValueError, match=r"--set optim.epochs: optim.epochs: expected an integer, got 'x'"):
        set_value(cfg, "optim.epochs", "x")
    assert cfg.optim.epochs == TrainConfig().optim.epochs  # a failed --set leaves the config as it was
    with pytest.raises(ValueError, match="unknown setting mode.x"):
        set_value(cfg, "mode.x", 1)


def test_yaml_numbers_are_read_as_yaml_1_2_reads_them():
    # PyYAML (YAML 1.1) reads 5e-5 as a string; a learning rate written so is a number here
    assert yaml.safe_load("5e-5") == "5e-5"
    assert parse_yaml("a: 5e-5\nb: 1.0e+3\nc: 12\nd: e5\n") == {"a": 5e-5, "b": 1000.0, "c": 12, "d": "e5"}


def test_model_config_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"model.json: lora_r: expected an integer, got '8'"):
        SERConfig.from_dict({"lora_r": "8"}, source="model.json")
    with pytest.raises(ValueError, match=r"embed_dropouts: too few values"):
        SERConfig.from_dict({"embed_dropouts": [0.1]})
    # the rules of SERModel are the config's: stated once, checked before any weight is made
    with pytest.raises(ValueError, match="linear_head needs layer_weighting 'weighted'"):
        SERConfig.tiny(linear_head=True).check()
    assert SERConfig.tiny(linear_head=True, layer_weighting="weighted").check().linear_head
    config = SERConfig.from_dict({"format": "serval", "serval_version": "0", "classes": ["a", "b"]})
    assert config.classes == ("a", "b") and config == SERConfig(classes=("a", "b"))


def test_server_config_is_read_and_checked():
    assert read(ServerConfig, {"port": 9000, "max_upload_mb": 5}) == ServerConfig(
        port=9000, max_upload_mb=5.0
    )
    with pytest.raises(ValueError, match=r"serve: unknown setting max_uploads \(known: .*max_upload_mb"):
        read(ServerConfig, {"max_uploads": 3}, "serve")
    with pytest.raises(ValueError, match=r"port: expected an integer, got '80a'"):
        read(ServerConfig, {"port": "80a"})
