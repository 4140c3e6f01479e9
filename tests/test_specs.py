"""`serval.specs.describe`: the one place that says what a model spec names, before anything loads."""

from __future__ import annotations

import json

import pytest

from serval import specs
from serval.locations import DEFAULT_MODEL
from serval.specs import describe


def test_each_kind_of_spec(model_dir, tmp_path):
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "ensemble.json").write_text(json.dumps({"members": ["a", "../b"]}))
    (tmp_path / "g.onnx").write_bytes(b"not read here")
    got = {
        "folder": describe(model_dir),
        "ensemble": describe(tmp_path / "ens"),
        "graph": describe(str(tmp_path / "g.onnx")),
        "hub": describe("someone/model"),
        "meralion": describe(f"meralion:{model_dir}"),
        "emotion2vec": describe("emotion2vec:base"),
        "llm": describe("llm:gpt@http://127.0.0.1:9"),
        "missing": describe(str(tmp_path / "absent")),
    }
    assert {kind: d.kind for kind, d in got.items()} == {kind: kind for kind in got}
    assert set(got) == set(specs.KINDS)
    assert got["folder"].folders == (model_dir,) and not got["folder"].default
    assert got["ensemble"].folders == (tmp_path / "ens" / "a", tmp_path / "ens" / "../b")
    assert got["graph"].path == tmp_path / "g.onnx" and got["graph"].folders == ()
    assert got["hub"].path is None and got["hub"].target == "someone/model"
    assert got["meralion"].target == str(model_dir) and got["meralion"].folders == (model_dir,)
    assert describe("meralion:owner/name").path is None  # a Hub id: fetched by the loader, not here
    assert got["emotion2vec"].target == "base" and got["llm"].target == "gpt@http://127.0.0.1:9"


def test_the_default(monkeypatch, model_dir, tmp_path):
    for spec in (None, "default"):
        d = describe(spec)
        assert d.spec == "default" and d.default and d.path == DEFAULT_MODEL
    monkeypatch.setattr(specs, "DEFAULT_MODEL", tmp_path / "none")
    assert describe(None).kind == "missing" and describe(None).default
    monkeypatch.setattr(specs, "DEFAULT_MODEL", model_dir)
    assert describe("default").folders == (model_dir,)


def test_a_bad_ensemble_file_fails_as_before(tmp_path):
    (tmp_path / "ensemble.json").write_text("{}")
    with pytest.raises(KeyError, match="members"):
        describe(tmp_path)
