"""Graph passes of qcompile (importable as ``qcompile.passes``)."""
from .infra import Pass, PassManager, PassResult

__all__ = ["Pass", "PassManager", "PassResult"]
