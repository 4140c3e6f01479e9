"""serval: speech emotion recognition (the MERaLiON-SER system)."""

__version__ = "0.1.0"


def load(model=None, device=None):
    """Load a model for inference (see `serval.inference.load`)."""
    from serval.inference import load as _load

    return _load(model, device=device)


__all__ = ["__version__", "load"]
