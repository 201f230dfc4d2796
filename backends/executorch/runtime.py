"""Run a .pte program in ExecuTorch's runtime (``executorch.runtime``), with the model's call signature.

The program is exported at the example inputs' shapes (XNNPACK delegates static shapes). A call with
another batch size is run in slices of the compiled batch (the last slice zero-padded and trimmed),
which is exact for models whose samples do not interact (every eval-mode CNN / encoder here).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

from qcompile.errors import InputError


def set_threads(n: int) -> None:
    """Size ExecuTorch's process-wide thread pool (used by XNNPACK)."""
    from executorch.extension.pybindings import portable_lib
    if portable_lib._threadpool_get_thread_count() != n:
        portable_lib._unsafe_reset_threadpool(n)


def thread_count() -> int:
    from executorch.extension.pybindings import portable_lib
    return int(portable_lib._threadpool_get_thread_count())


@dataclass
class PteProgram:
    buffer: bytes
    in_spec: object                 # pytree spec of (args, kwargs) at export
    out_spec: object                # pytree spec of the outputs
    example_flat: list              # flattened example inputs (shapes / dtypes the program takes)
    kwarg_order: tuple = ()
    _program: object = field(default=None, repr=False)
    _method: object = field(default=None, repr=False)

    @classmethod
    def from_edge(cls, edge, inputs) -> "PteProgram":
        ep = edge.exported_program()
        et = edge.to_executorch()
        flat, _ = pytree.tree_flatten((tuple(inputs.args), dict(inputs.kwargs)))
        return cls(bytes(et.buffer), ep.call_spec.in_spec, ep.call_spec.out_spec,
                   [t for t in flat if isinstance(t, torch.Tensor)], tuple(inputs.kwargs))

    @property
    def method(self):
        """The loaded ``forward`` method (loaded once, on first use)."""
        if self._method is None:
            from executorch.runtime import Runtime
            self._program = Runtime.get().load_program(self.buffer)
            self._method = self._program.load_method("forward")
        return self._method

    @property
    def batch(self) -> int | None:
        first = self.example_flat[0] if self.example_flat else None
        return int(first.shape[0]) if first is not None and first.dim() > 0 else None

    def run(self, args, kwargs):
        kwargs = {k: kwargs[k] for k in self.kwarg_order if k in kwargs} | kwargs
        flat, _ = pytree.tree_flatten((tuple(args), kwargs))
        flat = [t for t in flat if isinstance(t, torch.Tensor)]
        if len(flat) != len(self.example_flat):
            raise InputError(f"the .pte program takes {len(self.example_flat)} tensor input(s), got {len(flat)}")
        n = int(flat[0].shape[0]) if flat and flat[0].dim() > 0 else None
        if n == self.batch or n is None:
            outs = self._execute(flat)
        else:
            outs = self._run_sliced(flat, n)
        return pytree.tree_unflatten(outs, self.out_spec)

    def _execute(self, flat: list) -> list:
        for i, (t, e) in enumerate(zip(flat, self.example_flat)):
            if t.shape != e.shape or t.dtype != e.dtype:
                raise InputError(f"input {i} has shape {tuple(t.shape)} / {t.dtype}; the .pte program was exported "
                                 f"for {tuple(e.shape)} / {e.dtype}")
        with torch.no_grad():
            return list(self.method.execute([t.contiguous() for t in flat]))

    def _run_sliced(self, flat: list, n: int) -> list:
        b = self.batch
        if any(t.dim() == 0 or t.shape[0] != n for t in flat):
            raise InputError(f"inputs disagree on the batch size; the .pte program was exported for batch {b}")
        pieces = []
        for start in range(0, n, b):
            part = [t[start:start + b] for t in flat]
            short = b - part[0].shape[0]
            if short:
                part = [torch.cat([p, p.new_zeros((short, *p.shape[1:]))]) for p in part]
            outs = self._execute(part)
            if any(o.dim() == 0 or o.shape[0] != b for o in outs):
                raise InputError(f"the program was exported for batch {b} and its outputs are not batch-major: "
                                 f"call it with batch {b} or recompile with example inputs of batch {n}")
            pieces.append([o[:b - short] for o in outs])
        return [torch.cat(parts) for parts in zip(*pieces)]
