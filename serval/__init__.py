"""serval: speech emotion recognition (the MERaLiON-SER system)."""

from serval.hf import install_import_hook
from serval.predictor import Predictor
from serval.version import __version__

# transformers' Auto classes and pipeline() read serval model folders (serval.hf); registered now if
# transformers is imported, else when it is, so importing serval never imports transformers itself
install_import_hook()


def load(model=None, device=None, engine="auto", **options) -> Predictor:
    """Load a model for inference: any model spec (`serval.specs.describe` says what it names).

    `engine`: "auto" (ONNX Runtime on a CPU for local serval models, torch otherwise), "torch" or "onnx"
    (`serval.onnx_engine.load_engine`). Whatever the engine or kind, the result is a `Predictor`.
    """
    from serval.onnx_engine import load_engine

    return load_engine(model, engine=engine, device=device, **options)


__all__ = ["Predictor", "__version__", "load"]
