"""MimicNorm on a torchvision ResNet-18: convert, attach weight mean, train, fold, check.

    python scripts/convert_torchvision.py                      # 20 steps, batch 16, 64x64 images
    python scripts/convert_torchvision.py --steps 3 --image-size 32

Trains on generated data (random images, random labels among 10 classes), like `-ds synthetic`:
it shows the calls, not an accuracy. Prints one JSON line: the losses, the largest filter mean of
the centred convs, and the largest difference between the trained network's eval outputs and
its folded copy's (no BatchNorm, LastBN or residual scalar left), beside the largest output: a
few steps leave the LastBN's running statistics far from the logits', so the eval outputs are
large and the difference is float32 rounding of them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402

NUM_CLASSES = 10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="SGD steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns (and prints) its result."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    net = models.convert(torchvision.models.resnet18(num_classes=NUM_CLASSES), NUM_CLASSES)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    models.attach_weight_mean(optimizer, net, models.IMAGENET_RULE)
    losses = []
    for _ in range(args.steps):
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        labels = torch.randint(0, NUM_CLASSES, (args.batch_size,))
        loss = nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # the attached hook re-centres the filters here
        losses.append(loss.item())
    folded = models.fold(net)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    with torch.no_grad():
        reference = net.eval()(images)
        diff = (folded(images) - reference).abs().max().item()
    centred = models.centred_conv_weights(net, models.IMAGENET_RULE)
    result = {
        "losses": losses,
        "max_filter_mean": max(w.detach().flatten(1).mean(1).abs().max().item() for w in centred),
        "scaled_convs": sum(isinstance(m, models.ScaledConv2d) for m in net.modules()),
        "batchnorm_left": sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()),
        "max_abs_diff": diff,
        "max_abs_output": reference.abs().max().item(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
