"""The Backend protocol: annotate (from a support table), lower the reference graph, verify on the runtime."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import fx


@runtime_checkable
class Backend(Protocol):
    name: str

    def is_available(self) -> tuple[bool, str]:
        """(True, "") or (False, what is missing and how to install it)."""

    def support_table(self) -> list:
        """The OpSupport rows this backend runs in integer form."""

    def capabilities(self) -> Any:
        """Capabilities used to validate the user's config."""

    def default_config(self):
        """The QConfig this backend recommends."""

    def fusion_rules(self):
        """RuleSet of fusion patterns (conv+relu ...) the backend has single kernels for."""

    def lower(self, reference: fx.GraphModule, example_inputs: tuple, options: Any):
        """Lower the quantize/dequantize reference graph; return a runnable artifact payload."""

    def verify(self, reference: fx.GraphModule, lowered: Any, example_inputs: tuple) -> dict:
        """Run the lowered model on the real runtime, compare against the reference, list float nodes."""
