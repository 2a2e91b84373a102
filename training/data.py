"""What the engine needs from a dataset, generated data for demos and tests, and the loaders."""
from __future__ import annotations

import argparse
import signal
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .cli import Recipe
from .device_loader import DeviceLoader, TensorImages
from .distributed import Runtime
from .errors import UNKNOWN_IMAGE_FORMAT, DataError, UsageError


class DataSource(Protocol):
    """A dataset family as the runner sees it (CIFAR, ImageNet)."""

    recipe: Recipe  # the command line's defaults; its family picks models and weight-mean rule

    def load(self, args: argparse.Namespace, train: bool) -> tuple[Dataset, list[str]]:
        """The training or test split selected by `args` and its class names (label order)."""
        ...


def synthetic_classes(count: int) -> list[str]:
    """Class names of generated data: "synthetic-0", "synthetic-1", ..."""
    return [f"synthetic-{i}" for i in range(count)]


def class_difference(ours: list[str], theirs: list[str], our_name: str, their_name: str
                     ) -> str | None:
    """How two class lists differ, in a few words (None when they are equal): the names only one
    of them has (at most 5 each), or that the same names come in another label order."""
    if list(ours) == list(theirs):
        return None
    only = [(name, sorted(set(a) - set(b))) for name, a, b in
            ((our_name, ours, theirs), (their_name, theirs, ours))]
    parts = [f"only {name} has {len(names)}: {', '.join(names[:5])}"
             + (", ..." if len(names) > 5 else "") for name, names in only if names]
    if not parts:
        return f"{our_name} and {their_name} have the same classes in another label order"
    return f"{len(ours)} classes in {our_name}, {len(theirs)} in {their_name}; " + "; ".join(parts)


class SyntheticImages(Dataset):
    """Deterministic learnable images: a smooth random template per class plus per-image noise.

    Image i is a pure function of (seed, offset + i), so no files are needed and every process
    and run sees the same data; a test split uses the same seed and templates with an offset past
    the training images. `transform` (tensor augmentation) is applied on top.
    """

    def __init__(self, size: int, num_classes: int, image_size: int, seed: int = 0,
                 offset: int = 0, noise: float = 0.5,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.size, self.num_classes, self.image_size = size, num_classes, image_size
        self.seed, self.offset, self.noise, self.transform = seed, offset, noise, transform
        # 4x4 per class, upsampled on demand: 1000 full-size ImageNet templates would take 600 MB
        g = torch.Generator().manual_seed(seed)
        self.coarse = torch.randn(num_classes, 3, 4, 4, generator=g)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % self.num_classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index + 1)
        template = F.interpolate(self.coarse[label:label + 1], size=self.image_size,
                                 mode="bilinear", align_corners=False)[0]
        image = template + self.noise * torch.randn(template.shape, generator=g)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class SeededSamples(Dataset):
    """`dataset` whose sample i of epoch e is augmented with its own seed f(seed, e, i).

    Augmentation then depends neither on the number of workers nor on which samples came before,
    so a run resumed mid-epoch sees exactly the images an uninterrupted one would. Keys are
    `(epoch, index)` pairs (what `ResumableSampler` yields), so the epoch reaches persistent
    workers too; a plain index means epoch 0. With `seed` None the generator is left alone (test
    sets). Either way a sample that cannot be read raises DataError naming it, instead of a worker
    traceback.
    """

    def __init__(self, dataset: Dataset, seed: int | None) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.seed is None:
            return self._read(index)
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator, which the transforms draw from: torch.manual_seed would also
            # queue a CUDA seed, a slow path (stack capture) inside the workers of a CUDA build.
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self._read(index)

    def _read(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except DataError:
            raise
        except UnidentifiedImageError:
            raise DataError(f"cannot read {_sample_name(self.dataset, index)}: "
                            f"{UNKNOWN_IMAGE_FORMAT}") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # PIL (also a header claiming a huge image), LMDB and file-system failures
            raise DataError(f"cannot read {_sample_name(self.dataset, index)}: {e}") from None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch` of a run seeded with `seed`."""
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % 2**63


def _sample_name(dataset: Dataset, index: int) -> str:
    samples = getattr(dataset, "samples", None)  # ImageFolder's (path, label) list
    return str(samples[index][0]) if samples is not None else f"sample {index}"


class ResumableSampler(DistributedSampler):
    """DistributedSampler that yields `(epoch, index)` keys and can start an epoch `skip` batches
    in (resuming mid-epoch)."""

    def __init__(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.batch_size, self.skip = batch_size, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order of `epoch` (a pure function of seed and epoch), minus its first `skip` batches."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(super().__iter__())[self.skip * self.batch_size:]
        return iter([(self.epoch, index) for index in order])

    def __len__(self) -> int:
        return max(self.num_samples - self.skip * self.batch_size, 0)


def _ignore_stop_signals(worker_id: int) -> None:
    """Leave SIGINT/SIGTERM to the main process, which stops cleanly after its current step
    (Ctrl-C and `scancel` signal the workers too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loaders(train_set: Dataset | None, test_set: Dataset, args: argparse.Namespace,
                  rt: Runtime) -> tuple[Iterable | None, Iterable]:
    """Training loader (shuffled by a ResumableSampler seeded with `--seed`, call its `set_epoch`;
    incomplete last batches dropped) and test loader (every process its own 1/world shard).

    A `TensorImages` split gets a `DeviceLoader` on the training device, any other dataset a
    DataLoader with persistent workers. DataLoaders draw worker seeds from their own generator,
    never from the global one, so the model's random stream (dropout) is the same whether or not
    a run was resumed.
    """
    train_loader = None
    if train_set is not None:
        sampler = ResumableSampler(train_set, args.batch_size, num_replicas=rt.world_size,
                                   rank=rt.rank, shuffle=True, seed=args.seed)
        train_loader = _loader(train_set, sampler, args.seed, True, args, rt)
        if len(train_loader) == 0:
            raise UsageError(f"the training set has {len(train_set)} images, fewer than one batch "
                             f"of {args.batch_size} in each of {rt.world_size} process(es)")
    shard = range(rt.rank, len(test_set), rt.world_size)
    return train_loader, _loader(test_set, shard, None, False, args, rt)


def _loader(data: Dataset, sampler: Sampler | range, seed: int | None, drop_last: bool,
            args: argparse.Namespace, rt: Runtime) -> Iterable:
    if isinstance(data, TensorImages):
        return DeviceLoader(data.to(rt.device), args.batch_size, sampler, seed, drop_last)
    return DataLoader(SeededSamples(data, seed), batch_size=args.batch_size, sampler=sampler,
                      drop_last=drop_last, num_workers=args.workers,
                      pin_memory=rt.device.type == "cuda", persistent_workers=args.workers > 0,
                      worker_init_fn=_ignore_stop_signals,
                      generator=torch.Generator().manual_seed(args.seed))
