"""serval: speech emotion recognition (the MERaLiON-SER system)."""

from serval.version import __version__


def load(model=None, device=None):
    """Load a model for inference: any model spec (see `serval.inference.load`, the one resolver)."""
    from serval.inference import load as _load

    return _load(model, device=device)


__all__ = ["__version__", "load"]
