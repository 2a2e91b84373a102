"""A whole image split held as one tensor on the training device, augmented a batch at a time.

On a GPU a small network's step takes a few milliseconds, less than decoding and augmenting its
batch image by image on the CPU; the fastest CIFAR trainers therefore keep the data on the GPU.
Here random crop with zero padding, horizontal flip and rotation with nearest interpolation and
zero fill (torchvision's RandomCrop, RandomHorizontalFlip, RandomRotation) become one gather per
batch: every output pixel's source pixel is computed from the sample's parameters, and the three
steps compose exactly because each moves whole pixels.

The parameters of sample i in epoch e are a pure function of (seed, e, i), computed with integer
hashing that gives the same bits on any device; a run resumed mid-epoch, a DDP shard or the same
run on a GPU sees exactly the same images.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for int64 `x` in [0, 2**32), without int64 overflow."""
    low = (x & 0xFFFF) * m
    high = (((x >> 16) * m) & 0xFFFF) << 16
    return (low + high) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function (lowbias32) on int64 tensors holding 32-bit values."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_uniforms(seed: int, epoch: int, index: torch.Tensor, count: int) -> torch.Tensor:
    """`count` uniform numbers in [0, 1) per entry of `index` (float64, shape (len, count)), a
    pure function of (seed, epoch, index)."""
    key = hash32(torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64))
    key = hash32(hash32(key[0] ^ key[1]) ^ (epoch & _MASK32))
    per_sample = hash32(key ^ index.to(torch.int64))
    streams = torch.arange(count, dtype=torch.int64, device=index.device)
    return hash32(per_sample[:, None] ^ hash32(streams + 1)).double() / 2**32


@dataclass(frozen=True)
class CropFlipRotate:
    """Random crop `size` with `padding`, horizontal flip with probability 1/2, rotation by a
    uniform angle in +-`degrees` about the centre (torchvision's conventions)."""

    size: int = 32
    padding: int = 4
    degrees: float = 15.0

    def parameters(self, seed: int, epoch: int, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample crop offsets, flips and angles (degrees) for `index` (a CPU tensor)."""
        u = sample_uniforms(seed, epoch, index, 4)
        offsets = (u[:, :2] * (2 * self.padding + 1)).floor().long()
        return {"top": offsets[:, 0], "left": offsets[:, 1], "flip": u[:, 2] < 0.5,
                "angle": (2 * u[:, 3] - 1) * self.degrees}

    def packed(self, seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """One float64 CPU tensor (6, len(index)) of what the device needs per sample: index,
        crop top and left, flip, and the cosine and sine of the rotation, taken on the CPU so
        that every device gets the same bits (integers below 2**53 are exact in float64)."""
        params = self.parameters(seed, epoch, index)
        radians = params["angle"] * (-math.pi / 180)
        return torch.stack([index.double(), params["top"].double(), params["left"].double(),
                            params["flip"].double(), radians.cos(), radians.sin()])

    def source_pixels(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each sample of `packed` (what `packed` returned, on the images' device) and output
        pixel (row-major), the flat index of its source pixel in the un-augmented
        image and whether it has one (False: zero fill)."""
        s = self.size
        top, left = packed[1].long()[:, None], packed[2].long()[:, None]
        flip = packed[3].bool()[:, None]
        cos, sin = packed[4][:, None], packed[5][:, None]
        # Rotation: the output pixel centre relative to the image centre, rotated back (the
        # matrix of torchvision's tensor rotate), rounded half to even as grid_sample's nearest
        # does.
        centred = torch.arange(s, dtype=torch.float64, device=packed.device) - (s - 1) / 2
        y, x = centred.repeat_interleave(s), centred.repeat(s)
        col = torch.round(cos * x + sin * y + (s - 1) / 2).long()
        row = torch.round(-sin * x + cos * y + (s - 1) / 2).long()
        valid = (col >= 0) & (col < s) & (row >= 0) & (row < s)
        # Flip, then crop from the zero-padded image.
        col = torch.where(flip, s - 1 - col, col)
        row = row + top - self.padding
        col = col + left - self.padding
        valid &= (col >= 0) & (col < s) & (row >= 0) & (row < s)
        return (row * s + col).clamp(0, s * s - 1), valid


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device` without making the host wait: pinned and copied
    `non_blocking` on CUDA (a pageable or blocking copy would synchronise with the GPU)."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class TensorImages(Dataset):
    """A split as tensors: images (N, C, H, W), uint8 or float, labels (N,), the per-channel
    `mean` and `std` that normalise them (of images scaled to [0, 1] if uint8, as ToTensor
    does), the class names and the training `augment`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], classes: Sequence[str],
                 augment: CropFlipRotate | None = None) -> None:
        self.images, self.labels, self.classes = images, labels.long(), list(classes)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.divisor = torch.full((1,), 255.0)  # moves with the images: see `normalize`
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Image `index` normalised, not augmented."""
        return self.normalize(self.images[index:index + 1])[0], int(self.labels[index])

    def to(self, device: torch.device) -> "TensorImages":
        """The same split with its tensors on `device` (not copied if already there)."""
        moved = copy.copy(self)
        for name in ("images", "labels", "mean", "std", "divisor"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """float32 (images - mean) / std, uint8 images first divided by 255: the operations of
        torchvision's ToTensor and Normalize, so the results are the same bits on the CPU.

        255 is a tensor on the images' device: CUDA divides by a Python or CPU scalar as a
        multiplication by its reciprocal (one bit off for about half the uint8 values), by a
        device tensor exactly, as the CPU does."""
        scaled = images.float() / self.divisor if images.dtype == torch.uint8 else images.float()
        return (scaled - self.mean) / self.std

    def batch(self, index: torch.Tensor, seed: int | None = None, epoch: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and labels of `index` (a CPU tensor); augmented when the split has
        an `augment` and a `seed` is given. One non-blocking copy to the device per batch."""
        device = self.images.device
        if self.augment is None or seed is None:
            on_device = to_device(index, device)
            return self.normalize(self.images[on_device]), self.labels[on_device]
        packed = to_device(self.augment.packed(seed, epoch, index), device)
        on_device = packed[0].long()
        images = self.images[on_device]
        source, valid = self.augment.source_pixels(packed)
        n, c, h, w = images.shape
        picked = images.reshape(n, c, h * w).gather(2, source[:, None, :].expand(n, c, h * w))
        images = (picked * valid[:, None, :].to(picked.dtype)).reshape(n, c, h, w)
        return self.normalize(images), self.labels[on_device]


class DeviceLoader:
    """Batches of a `TensorImages` split in the order of `sampler`: `(epoch, index)` keys of a
    `ResumableSampler`, augmented with `seed`, or plain indices, not augmented (test splits)."""

    def __init__(self, data: TensorImages, batch_size: int, sampler: Sampler | Sequence[int],
                 seed: int | None = None, drop_last: bool = False) -> None:
        self.data, self.batch_size, self.sampler = data, batch_size, sampler
        self.seed, self.drop_last = seed, drop_last

    def __len__(self) -> int:
        whole, rest = divmod(len(self.sampler), self.batch_size)
        return whole + int(rest > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = list(self.sampler)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            chunk = keys[start:start + self.batch_size]
            epoch = chunk[0][0] if isinstance(chunk[0], tuple) else 0
            index = torch.tensor([k[1] if isinstance(k, tuple) else k for k in chunk])
            yield self.data.batch(index, self.seed, epoch)
