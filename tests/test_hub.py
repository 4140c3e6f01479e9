"""A serval model folder on the Hugging Face Hub's terms: its model card, and what `push_to_hub` uploads
(to a stand-in for `huggingface_hub.HfApi` that records the calls and the files: the Hub is out of reach)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import huggingface_hub
import pytest
import torch

import serval
from serval.checkpoint import load_model, save_model
from serval.hub import push_to_hub
from serval.locations import DEFAULT_MODEL
from serval.model import SERConfig, SERModel
from serval.vocab import DIMENSIONS

REAL_API = huggingface_hub.HfApi  # the signatures the stand-in's calls are bound against


class FakeHub:
    """`HfApi`'s calls push_to_hub makes, bound against the real signatures; every file sent is kept."""

    instances: list[FakeHub] = []

    def __init__(self, token=None, **kwargs):
        self.token, self.calls, self.files = token, [], {}
        FakeHub.instances.append(self)

    def _record(self, name: str, *args, **kwargs) -> inspect.BoundArguments:
        bound = inspect.signature(getattr(REAL_API, name)).bind(self, *args, **kwargs)
        self.calls.append((name, {k: v for k, v in bound.arguments.items() if k != "self"}))
        return bound

    def create_repo(self, *args, **kwargs):
        return f"https://huggingface.co/{self._record('create_repo', *args, **kwargs).arguments['repo_id']}"

    def upload_folder(self, *args, **kwargs):
        folder = Path(self._record("upload_folder", *args, **kwargs).arguments["folder_path"])
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                self.files[f.relative_to(folder).as_posix()] = f.read_bytes()

    def upload_file(self, *args, **kwargs):
        bound = self._record("upload_file", *args, **kwargs).arguments
        source = bound["path_or_fileobj"]
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        self.files[bound["path_in_repo"]] = data


@pytest.fixture
def hub(monkeypatch) -> list[FakeHub]:
    FakeHub.instances = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub.instances


def front_matter(card: str) -> dict[str, str]:
    """The README's YAML metadata as {key: value} (tags as one comma-joined value)."""
    head = card.split("---\n")[1]
    meta, key = {}, None
    for line in head.splitlines():
        if line.startswith("- ") and key:
            meta[key] = ",".join(filter(None, [meta[key], line[2:]]))
        else:
            key, _, value = line.partition(": ")
            key = key.rstrip(":")
            meta[key] = value
    return meta


def test_push_uploads_a_loadable_model_with_its_card(hub, tmp_path):
    torch.manual_seed(7)
    model = SERModel(SERConfig.tiny(classes=("neutral", "angry", "sad", "happy")))
    folder = save_model(model, tmp_path / "tiny")
    url = push_to_hub(folder, "someone/tiny-ser", token="hf_x", private=True)
    assert url == "https://huggingface.co/someone/tiny-ser"
    (api,) = hub
    assert api.token == "hf_x"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    create, upload = (args for _, args in api.calls)
    assert (
        create["repo_id"] == "someone/tiny-ser" and create["private"] is True and create["exist_ok"] is True
    )
    assert upload["repo_id"] == "someone/tiny-ser" and upload.get("repo_type") in (None, "model")
    assert {"config.json", "model.safetensors", "README.md", "preprocessor_config.json"} <= set(api.files)

    # what was sent is the model: written out again, it loads to the same weights and labels
    repo = tmp_path / "repo"
    repo.mkdir()
    for name, data in api.files.items():
        (repo / name).write_bytes(data)
    loaded = load_model(repo)
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert serval.load(repo, engine="torch").classes == ("neutral", "angry", "sad", "happy")
    config = json.loads(api.files["config.json"])
    assert config["model_type"] == "serval" and config["architectures"] == ["ServalForAudioClassification"]
    pre = json.loads(api.files["preprocessor_config.json"])
    assert pre["feature_extractor_type"] == "ServalFeatureExtractor" and pre["sampling_rate"] == 16000
    meta = front_matter(api.files["README.md"].decode())
    assert meta["library_name"] == "serval" and meta["pipeline_tag"] == "audio-classification"
    assert meta["license"] == "other" and "speech-emotion-recognition" in meta["tags"].split(",")


def test_the_bundled_model_pushes_whole(hub):
    push_to_hub(DEFAULT_MODEL, "someone/serval-default")
    (api,) = hub
    assert api.token is None  # the user's own login is used
    # every file of the folder, the shipped ONNX graph in onnx/ too
    shipped = {
        f.relative_to(DEFAULT_MODEL).as_posix(): f.read_bytes()
        for f in DEFAULT_MODEL.rglob("*")
        if f.is_file()
    }
    assert api.files == shipped and "model.safetensors" in shipped
    assert front_matter(shipped["README.md"].decode())["license"] == "other"  # NC-SA, NC-ND, AGPL data


def test_a_folder_without_a_model_is_refused_before_the_hub(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_to_hub(DEFAULT_MODEL.parent, "someone/nothing")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        push_to_hub(tmp_path, "someone/nothing")
    assert hub == []  # no client was even made


def test_the_model_card_names_only_trained_scores(trained_dims_models):
    none = (trained_dims_models[()] / "README.md").read_text()
    arousal = (trained_dims_models[("arousal",)] / "README.md").read_text()
    assert "scores in [0, 1]" not in none
    assert "Its arousal, valence, dominance outputs were not trained: null in records." in none
    assert ") and arousal scores in [0, 1]. Its valence, dominance outputs were not trained" in arousal
    assert "not trained" not in (trained_dims_models[DIMENSIONS] / "README.md").read_text()
