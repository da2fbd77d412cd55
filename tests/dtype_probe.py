"""Which dtypes a piece of tadq creates, and where: the tests of the MPS rule (``tadq.device.wide_dtype``) run it with
the rule switched to float32 (on the CPU, or on the meta device as a stand-in for MPS) and check that no float64
tensor appears there (MPS refuses every one)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class DtypeRecorder(TorchDispatchMode):
    """Records the dtype and device type of every tensor each aten op returns inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[tuple[torch.dtype, str], set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                self.ops.setdefault((leaf.dtype, leaf.device.type), set()).add(str(func))
        return result

    def float64_ops(self, device_type: str | None = None) -> set[str]:
        """The ops that returned a float64 tensor (on ``device_type``, or anywhere)."""
        return {op for (dtype, where), ops in self.ops.items() for op in ops
                if dtype == torch.float64 and device_type in (None, where)}
