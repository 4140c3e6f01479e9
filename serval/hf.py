"""Hugging Face: transformers' Auto classes and `pipeline`, model-directory files, the model card, the Hub.

After `import serval`, `transformers.pipeline("audio-classification", model=<serval model dir>)`
works with no `trust_remote_code`: `register` adds serval's config, feature extractor and model
(`serval.hf_model`) to the Auto classes (the files it reads are written by `serval.hub`).
Importing this module imports neither transformers nor torch; `import serval` registers at once when transformers is already imported, and otherwise
the moment it is (`install_import_hook`), so the inference path never loads transformers.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from serval.hub import MODEL_TYPE

_registered = False


def register() -> None:
    """Register serval's config, feature extractor and model with transformers' Auto classes (once)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification

    from serval.hf_model import ServalConfig, ServalFeatureExtractor, ServalForAudioClassification

    AutoConfig.register(MODEL_TYPE, ServalConfig, exist_ok=True)
    AutoFeatureExtractor.register(ServalConfig, ServalFeatureExtractor, exist_ok=True)
    AutoModelForAudioClassification.register(ServalConfig, ServalForAudioClassification, exist_ok=True)
    AutoModel.register(ServalConfig, ServalForAudioClassification, exist_ok=True)
    _registered = True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is first imported, it registers serval right after."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # once, and so that find_spec below finds the real package
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                try:
                    register()
                except Exception as e:  # a transformers too old or too new must not break its own import
                    print(f"serval: not registered with transformers ({e})", file=sys.stderr)

            spec.loader.exec_module = exec_module
        return spec


def install_import_hook() -> None:
    """Register with transformers now if it is imported, else as soon as it is."""
    if sys.modules.get("transformers") is not None:  # None: blocked, as when it is not installed
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
