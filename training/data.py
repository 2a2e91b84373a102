"""What the engine needs from a dataset, generated data for demos and tests, and the loaders."""
from __future__ import annotations

import argparse
import signal
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .distributed import Runtime
from .errors import UNKNOWN_IMAGE_FORMAT, DataError, UsageError


class DataSource(Protocol):
    """A dataset family as the runner sees it (CIFAR, ImageNet)."""

    family: str  # model registry family and weight-mean rule: "cifar" or "imagenet"

    def load(self, args: argparse.Namespace, train: bool) -> tuple[Dataset, int]:
        """The training or test split selected by `args` and its number of classes."""
        ...


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
    so a run resumed mid-epoch sees exactly the images an uninterrupted one would. With `seed`
    None the torch generator is left alone (test sets). Either way a sample that cannot be read
    raises DataError naming it, instead of a worker traceback.
    """

    def __init__(self, dataset: Dataset, seed: int | None) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Seed the next epoch's augmentation (workers copy the dataset when an epoch starts)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> Any:
        if self.seed is None:
            return self._read(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 100_000_007 + index) % 2**63)
            return self._read(index)

    def _read(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except DataError:
            raise
        except UnidentifiedImageError:
            raise DataError(f"cannot read {_sample_name(self.dataset, index)}: "
                            f"{UNKNOWN_IMAGE_FORMAT}") from None
        except (OSError, ValueError, SyntaxError) as e:  # PIL, LMDB and file-system failures
            raise DataError(f"cannot read {_sample_name(self.dataset, index)}: {e}") from None


def _sample_name(dataset: Dataset, index: int) -> str:
    samples = getattr(dataset, "samples", None)  # ImageFolder's (path, label) list
    return str(samples[index][0]) if samples is not None else f"sample {index}"


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch `skip` batches in (resuming mid-epoch)."""

    def __init__(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.batch_size, self.skip = batch_size, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order of `epoch` (a pure function of seed and epoch), minus its first `skip` batches."""
        super().set_epoch(epoch)
        self.skip = skip
        if isinstance(self.dataset, SeededSamples):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip * self.batch_size:])

    def __len__(self) -> int:
        return max(self.num_samples - self.skip * self.batch_size, 0)


def _ignore_stop_signals(worker_id: int) -> None:
    """Leave SIGINT/SIGTERM to the main process, which stops cleanly after its current step
    (Ctrl-C and `scancel` signal the workers too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loaders(train_set: Dataset | None, test_set: Dataset, args: argparse.Namespace,
                  rt: Runtime) -> tuple[DataLoader | None, DataLoader]:
    """Training loader (shuffled by a ResumableSampler seeded with `--seed`, call its `set_epoch`;
    incomplete last batches dropped) and test loader (every process its own 1/world shard).

    Loaders draw worker seeds from their own generator, never from the global one, so the model's
    random stream (dropout) is the same whether or not a run was resumed.
    """
    pin = rt.device.type == "cuda"
    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin,
                  worker_init_fn=_ignore_stop_signals,
                  generator=torch.Generator().manual_seed(args.seed))
    train_loader = None
    if train_set is not None:
        train_set = SeededSamples(train_set, args.seed)
        sampler = ResumableSampler(train_set, args.batch_size, num_replicas=rt.world_size,
                                   rank=rt.rank, shuffle=True, seed=args.seed)
        train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, **common)
        if len(train_loader) == 0:
            raise UsageError(f"the training set has {len(train_set)} images, fewer than one batch "
                             f"of {args.batch_size} in each of {rt.world_size} process(es)")
    shard = Subset(SeededSamples(test_set, None), range(rt.rank, len(test_set), rt.world_size))
    return train_loader, DataLoader(shard, shuffle=False, **common)
