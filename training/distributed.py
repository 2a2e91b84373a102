"""Devices and processes: CPU, one GPU, DataParallel over several, or torchrun's DDP (NCCL/gloo)."""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from .errors import UsageError


@dataclass(frozen=True)
class Runtime:
    """Where this process computes and its place among torchrun's processes."""

    device: torch.device
    device_ids: list[int] = field(default_factory=list)  # CUDA ids; several = DataParallel
    rank: int = 0
    world_size: int = 1
    distributed: bool = False  # launched by torchrun: DistributedDataParallel

    @property
    def is_main(self) -> bool:
        """True in the process that logs and saves (rank 0)."""
        return self.rank == 0


def select_gpus(gpu: list[int] | None) -> list[int]:
    """CUDA ids from `--gpu`: None = every visible GPU (none without CUDA), [-1] = CPU only.

    Asking for a GPU id on a machine without CUDA, or for one that does not exist, is an error
    rather than a silent fall-back to the CPU.
    """
    if gpu == [-1]:
        return []
    if gpu is None:
        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    ids = " ".join(map(str, gpu))
    if not torch.cuda.is_available():
        raise UsageError(f"--gpu {ids}: CUDA is not available here; use --gpu -1 for the CPU")
    count = torch.cuda.device_count()
    if any(not 0 <= i < count for i in gpu) or len(set(gpu)) != len(gpu):
        raise UsageError(f"--gpu {ids}: this machine has GPUs 0..{count - 1}, each usable once")
    return list(gpu)


def setup_runtime(gpu: list[int] | None) -> Runtime:
    """Pick devices and, under torchrun, join the process group (NCCL on GPU, gloo on CPU)."""
    ids = select_gpus(gpu)
    if "RANK" not in os.environ:
        return Runtime(torch.device("cuda", ids[0]) if ids else torch.device("cpu"), ids)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if ids:
        if local_rank >= len(ids):
            raise UsageError(f"process with LOCAL_RANK {local_rank} has no GPU: only "
                             f"{len(ids)} selected ({ids}); lower --nproc_per_node")
        ids = [ids[local_rank]]
        torch.cuda.set_device(ids[0])
    device = torch.device("cuda", ids[0]) if ids else torch.device("cpu")
    if ids:  # device_id binds the NCCL communicator to this process's GPU (else NCCL guesses)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
    return Runtime(device, ids, rank, world_size, distributed=True)


def cleanup() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class AutocastReplica(nn.Module):
    """`net` under autocast with a fixed dtype, for DataParallel: its replica threads re-enter
    autocast without a dtype, and the autocast dtype is thread-local (CUDA's default: float16),
    so `--amp bf16` would otherwise run the replicas in float16. No state_dict keys of its own
    beyond `net.`; the trainer saves the unwrapped network anyway."""

    def __init__(self, net: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.device_type, self.dtype = net, device_type, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.net(*args, **kwargs)


def wrap_model(net: nn.Module, rt: Runtime, amp_dtype: torch.dtype | None = None) -> nn.Module:
    """DistributedDataParallel under torchrun, DataParallel over several GPUs (each replica under
    autocast with `amp_dtype`, if any: `AutocastReplica`), else `net` itself."""
    if rt.distributed:
        return nn.parallel.DistributedDataParallel(net, device_ids=rt.device_ids or None)
    if len(rt.device_ids) > 1:
        replica = net if amp_dtype is None else AutocastReplica(net, rt.device.type, amp_dtype)
        return nn.DataParallel(replica, device_ids=rt.device_ids)
    return net


class SyncedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d on (N, C) inputs whose training statistics cover the whole global batch.

    Statistics are all-reduced with differentiable collectives, so it works with gloo on the CPU
    as well as NCCL (`nn.SyncBatchNorm` is GPU-only). Buffers and state_dict keys are those of
    BatchNorm1d: checkpoints move freely between synced and per-process runs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"SyncedBatchNorm1d expects (N, C) input, got shape {tuple(x.shape)}")
        sums = _differentiable_all_reduce(torch.cat([x.sum(0), x.new_full((1,), x.shape[0])]))
        count, mean = sums[-1], sums[:-1] / sums[-1]
        var = _differentiable_all_reduce(((x - mean) ** 2).sum(0)) / count
        if self.track_running_stats:  # count stays a device tensor: .item() would sync
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
                              ) -> None:
        """BatchNorm's running-statistics update, in tensor ops only (no host-device sync)."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as in BatchNorm
            factor: torch.Tensor | float = 1.0 / self.num_batches_tracked.to(mean.dtype)
        else:
            factor = self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(var * count / (count - 1).clamp(min=1), factor)


def _differentiable_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes, with a backward. torch marks
    `torch.distributed.nn.functional.all_reduce` deprecated (a FutureWarning at every call) in
    favour of its private `_functional_collectives`; the warning is silenced for this call only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_reduce is "
                                "deprecated", FutureWarning)
        return dist_nn.all_reduce(tensor)


def sync_last_bn_(net: nn.Module) -> nn.Module:
    """Make the last BN of a MimicNorm model compute its batch statistics across processes."""
    bn = net.last_bn.bn
    synced = SyncedBatchNorm1d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                               bn.track_running_stats)
    synced.load_state_dict(bn.state_dict())
    net.last_bn.bn = synced.to(bn.running_mean.device)
    return net


def is_distributed() -> bool:
    """True in a process of a torchrun process group."""
    return dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes in place (a no-op without a process group)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of a CPU `tensor` over all processes (`tensor` itself without a
    process group); NCCL reduces on the GPU, so the values travel there and back."""
    if not dist.is_initialized():
        return tensor
    shared = tensor.to("cuda") if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(shared, op=dist.ReduceOp.MAX)
    return shared.cpu()


@torch.no_grad()
def broadcast_buffers(net: nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) to every process."""
    if dist.is_initialized():
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every process, in rank order ([obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def main_process_first(rt: Runtime) -> Iterator[None]:
    """Run the block on rank 0 first (e.g. a download), then on the other processes."""
    if rt.distributed and not rt.is_main:
        dist.barrier()
    yield
    if rt.distributed and rt.is_main:
        dist.barrier()
