"""A template qcompile backend (see docs/extending.md): int8 conv2d / linear on reference kernels."""
from .backend import ToyBackend, ToyOptions

__all__ = ["ToyBackend", "ToyOptions"]
