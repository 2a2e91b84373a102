"""Counting where code would make the host wait for a GPU, without a GPU.

On a GPU the host waits for the device when it reads a value back (`.item()`, `bool(t)`,
`.tolist()`, `.cpu()`), when it asks for a result whose shape depends on the values (`nonzero`,
boolean masks, `unique`), and when it copies to the device without `non_blocking=True` (PyTorch
then synchronises the stream). Each of these is one call of the dispatcher: `_local_scalar_dense`,
`_to_copy` or `copy_` between two devices, or one of `DATA_DEPENDENT`; a `TorchDispatchMode` sees
every one of them, whoever makes it (our code, torch's optimizers, autograd), except the copy that
`torch.tensor(data, device=...)`, `torch.as_tensor` and `Tensor.new_tensor` make from Python
data below the dispatcher's Python layer: a `TorchFunctionMode` counts those calls instead.

`HostSyncs` counts them for code that runs with the `meta` device standing in for the GPU: meta
tensors have shapes and dtypes but no values, so the GPU code path runs on the CPU machine and
every host-device crossing is visible. Values read back from meta are stand-ins (True and 1),
which is all the training loop's bookkeeping needs (finite-loss flags, sums to print).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                  aten.unique_dim.default, aten.unique_consecutive.default}
FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


class _FromData(TorchFunctionMode):
    """Counts tensors made on the device from Python data (a blocking copy on a GPU)."""

    def __init__(self, syncs: HostSyncs) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in FROM_DATA:
            like = args[0] if func is torch.Tensor.new_tensor else None
            data = args[1] if like is not None else args[0]
            device = kwargs.get("device") or (like.device if like is not None else "cpu")
            if torch.device(device).type == self.syncs.device and not torch.is_tensor(data):
                self.syncs.blocking[self.syncs.step] += 1
        return func(*args, **kwargs)


class HostSyncs(TorchDispatchMode):
    """Within the block, counts per `step` (set by the caller) the calls that synchronise on a
    GPU: `reads` (a value or a copy to the host), `blocking` (a host-to-device copy without
    `non_blocking`) and `data_dependent`; and the `non_blocking` host-to-device copies, which do
    not. `device` is the stand-in device type ("meta")."""

    def __init__(self, device: str = "meta") -> None:
        super().__init__()
        self.device, self.step = device, 0
        self._from_data = _FromData(self)
        self.reads: Counter[int] = Counter()
        self.blocking: Counter[int] = Counter()
        self.data_dependent: Counter[int] = Counter()
        self.non_blocking: Counter[int] = Counter()

    def __enter__(self) -> HostSyncs:
        self._from_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._from_data.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and self._on_device(args[0]):
            self.reads[self.step] += 1
            return True if args[0].dtype == torch.bool else 1
        if func is aten._to_copy.default:
            source = args[0].device
            target = torch.device(kwargs.get("device") or source)
            return self._copy(func, args, kwargs, source, target, kwargs.get("non_blocking"))
        if func is aten.copy_.default:
            target, source = args[0].device, args[1].device
            return self._copy(func, args, kwargs, source, target, kwargs.get("non_blocking",
                                                                           args[2:3] == (True,)))
        if func in DATA_DEPENDENT and self._on_device(args[0]):
            self.data_dependent[self.step] += 1
        return func(*args, **kwargs)

    def _on_device(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == self.device

    def _copy(self, func: Any, args: tuple, kwargs: dict, source: torch.device,
              target: torch.device, non_blocking: bool | None) -> Any:
        if source.type == self.device and target.type != self.device:  # to the host
            self.reads[self.step] += 1
            if func is aten.copy_.default:
                return args[0].fill_(1)
            return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if target.type == self.device and source.type != self.device:  # to the device
            (self.non_blocking if non_blocking else self.blocking)[self.step] += 1
        return func(*args, **kwargs)

    def syncs(self) -> Counter[int]:
        """Every synchronising call per step: reads + blocking copies + data-dependent shapes."""
        return self.reads + self.blocking + self.data_dependent
