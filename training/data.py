"""What the engine needs from a dataset, generated data for demos and tests, and the loaders."""
from __future__ import annotations

import argparse
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .distributed import Runtime
from .errors import UsageError


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


def build_loaders(train_set: Dataset | None, test_set: Dataset, args: argparse.Namespace,
                  rt: Runtime) -> tuple[DataLoader | None, DataLoader]:
    """Training loader (shuffled by a DistributedSampler seeded with `--seed`, call its `set_epoch`;
    incomplete last batches dropped) and test loader (every process its own 1/world shard)."""
    pin = rt.device.type == "cuda"
    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin)
    train_loader = None
    if train_set is not None:
        sampler = DistributedSampler(train_set, num_replicas=rt.world_size, rank=rt.rank,
                                     shuffle=True, seed=args.seed)
        train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, **common)
        if len(train_loader) == 0:
            raise UsageError(f"the training set has {len(train_set)} images, fewer than one batch "
                             f"of {args.batch_size} in each of {rt.world_size} process(es)")
    shard = Subset(test_set, range(rt.rank, len(test_set), rt.world_size))
    return train_loader, DataLoader(shard, shuffle=False, **common)
