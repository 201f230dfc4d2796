"""Compatibility name: the support-table vocabulary lives in the core, :mod:`qcompile.support` (passes
read it, so it cannot sit in the backends layer above them)."""
from qcompile.support import ANCHOR, FIXED, PROPAGATE, SHARED, Capabilities, OpSupport  # noqa: F401
