"""Stand-ins for tensors of devices this machine does not have."""

from __future__ import annotations

import torch


class OnDeviceWithoutFloat64(torch.Tensor):
    """A tensor as an MPS extractor or network returns it: ``double()`` is refused there; ``cpu()`` or ``to(...)``
    the host gives a plain host tensor (whose ``double()`` works)."""

    def double(self, *args, **kwargs):
        raise TypeError("this device has no float64")

    def cpu(self, *args, **kwargs):
        return torch.Tensor.cpu(self, *args, **kwargs).as_subclass(torch.Tensor)

    def to(self, *args, **kwargs):
        return torch.Tensor.to(self, *args, **kwargs).as_subclass(torch.Tensor)
