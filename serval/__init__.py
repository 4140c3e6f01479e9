"""serval: speech emotion recognition (the MERaLiON-SER system)."""

from serval.hf import install_import_hook
from serval.version import __version__

# transformers' Auto classes and pipeline() read serval model folders (serval.hf); registered now if
# transformers is imported, else when it is, so importing serval never imports transformers itself
install_import_hook()


def load(model=None, device=None):
    """Load a model for inference: any model spec (see `serval.inference.load`, the one resolver)."""
    from serval.inference import load as _load

    return _load(model, device=device)


__all__ = ["__version__", "load"]
