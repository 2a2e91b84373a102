"""The paper's diagnostics: decorrelation at initialisation, the last BN's adaptive lr.

1. **Decorrelation at initialisation** (no training). For each network and form (BN, MimicNorm,
   WeightMean only, NoNorm) and seed, one batch goes through the freshly initialised network in
   training mode; at the input of every ReLU (the pre-activation, after BN where there is one)
   and at the logits, per layer:
   - `cosine`: the mean cosine similarity between the activations of two different samples
     (1: every sample looks the same to the layer; 0: orthogonal);
   - `channel_mean_sq` and `channel_var`: the channel means squared and the channel variances
     (over samples and positions), averaged over channels: signal propagation, as
     normalisation-free papers plot it.
   The paper's argument: without normalisation samples become correlated with depth; weight
   mean, like BN, keeps them apart.
2. **The last BN's adaptive learning rate.** A MimicNorm network trained for a few epochs at a
   good and at a too-high learning rate; every step records the last BN's running variance and
   mean (averaged over classes), the logits' standard deviation over the batch, the loss and
   the lr. The last BN divides the logits by their batch standard deviation, so as the logits
   grow, the gradient reaching the body shrinks: an adaptive learning rate.

    python -m experiments.diagnostics --source data/cifar10-jpeg.tar.gz \
        --out-dir results/diagnostics

Outputs: decorrelation.csv / .png, lastbn.csv / .png. Without --source, both use generated
images (seconds; what the tests run).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

if __package__ in (None, ""):  # run as a file: python experiments/diagnostics.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402
from experiments import grid  # noqa: E402
from experiments.tables import write_csv  # noqa: E402

# form -> (registry variant, weight mean at initialisation)
FORMS = {"BN": (models.BN, False), "MimicNorm": (models.MIMIC, True),
         "WeightMean only": (models.NO_NORM, True), "NoNorm": (models.NO_NORM, False)}


def mean_cosine(activations: torch.Tensor) -> float:
    """Mean cosine similarity between the activations of different samples (dim 0); a sample
    whose activation is all zeros counts as orthogonal to every other."""
    flat = activations.flatten(1).double()
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
    gram = unit @ unit.T
    n = len(flat)
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def channel_stats(activations: torch.Tensor) -> tuple[float, float]:
    """(mean over channels of the squared channel mean, mean over channels of the channel
    variance), each channel's statistics taken over samples and positions."""
    per_channel = activations.double().transpose(0, 1).flatten(1)
    return (float(per_channel.mean(dim=1).pow(2).mean()),
            float(per_channel.var(dim=1, unbiased=False).mean()))


def pre_activations(model: nn.Module, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) at the input of every ReLU in the order they run, then the logits."""
    seen: list[tuple[str, torch.Tensor]] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.append((names[module], inputs[0].detach().clone()))  # ReLUs work in place

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return [*seen, ("logits", logits.detach())]


def init_model(arch: str, form: str, num_classes: int, seed: int, width: float = 1.0
               ) -> nn.Module:
    """`arch` in `form`, freshly initialised with `seed`, filters centred where the form says."""
    variant, centred = FORMS[form]
    torch.manual_seed(seed)
    model = models.create_model(models.twin_name(arch, variant), num_classes, "cifar",
                                width=width)
    if centred:
        models.WeightMean(model, models.CIFAR_RULE)()
    return model.train()


def decorrelation(archs: list[str], images: torch.Tensor, num_classes: int, seeds: list[int],
                  width: float = 1.0) -> pd.DataFrame:
    """One row per arch, form, seed and layer: depth (1 = first), layer, cosine, channel mean^2
    and variance."""
    rows = []
    for arch in archs:
        for form in FORMS:
            for seed in seeds:
                model = init_model(arch, form, num_classes, seed, width)
                for depth, (layer, acts) in enumerate(pre_activations(model, images), 1):
                    mean_sq, var = channel_stats(acts)
                    rows.append({"arch": arch, "form": form, "seed": seed, "depth": depth,
                                 "layer": layer, "cosine": mean_cosine(acts),
                                 "channel_mean_sq": mean_sq, "channel_var": var})
    return pd.DataFrame(rows)


def last_bn_of(model: nn.Module) -> nn.BatchNorm1d:
    """The BatchNorm1d inside the model's LastBN."""
    found = [m.bn for m in model.modules() if isinstance(m, models.LastBN)]
    if len(found) != 1:
        raise ValueError("the model has no single LastBN")
    return found[0]


def last_bn_dynamics(arch: str, lrs: list[float], batches: Callable[[int], Iterable], steps: int,
                     warm_steps: int, num_classes: int, seed: int = 0, width: float = 0.25
                     ) -> pd.DataFrame:
    """One row per lr and optimizer step of MimicNorm `arch`: the last BN's running variance
    and mean (class averages), the logits' batch std (before the last BN), loss and lr.
    `batches(epoch)` gives an epoch's (images, labels) batches; the lr warms up linearly over
    `warm_steps` steps as in the recipe."""
    rows = []
    for peak in lrs:
        model = init_model(arch, "MimicNorm", num_classes, seed, width)
        bn = last_bn_of(model)
        logits_std: list[float] = []
        handle = bn.register_forward_pre_hook(
            lambda _m, inputs: logits_std.append(float(inputs[0].detach().std(dim=0).mean())))
        optimizer = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9,
                                    weight_decay=5e-4)
        models.attach_weight_mean(optimizer, model)
        step, epoch, loss_fn = 0, 0, nn.CrossEntropyLoss()
        while step < steps:
            for images, labels in batches(epoch):
                lr = peak * min(1.0, (step + 1) / warm_steps) if warm_steps else peak
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = loss_fn(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                loss_value = loss.item()
                rows.append({"lr_peak": peak, "step": step, "epoch": epoch + 1, "lr": lr,
                             "loss": loss_value, "running_var": float(bn.running_var.mean()),
                             "running_mean_abs": float(bn.running_mean.abs().mean()),
                             "logits_std": logits_std[-1]})
                if step == steps or not math.isfinite(loss_value):
                    break
            if rows and not math.isfinite(rows[-1]["loss"]):
                break
            epoch += 1
        handle.remove()
    return pd.DataFrame(rows)


def plot_decorrelation(table: pd.DataFrame, path: Path) -> None:
    """Per network, cosine and channel variance against depth (mean over seeds), one line per
    form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(table["arch"]))
    metrics = (("cosine", "mean cosine similarity between samples", "linear"),
               ("channel_mean_sq", "channel mean$^2$", "log"),
               ("channel_var", "channel variance", "log"))
    fig, axes = plt.subplots(len(archs), len(metrics), figsize=(4.2 * len(metrics),
                                                                 3.2 * len(archs)),
                             squeeze=False)
    for row, arch in zip(axes, archs):
        mine = table[table["arch"] == arch]
        for ax, (metric, label, scale) in zip(row, metrics):
            for form in FORMS:  # MimicNorm's body is WeightMean only's: dashed, on top
                curve = mine[mine["form"] == form].groupby("depth")[metric].mean()
                ax.plot(curve.index, curve.values, marker="o", markersize=2.5, label=form,
                        linestyle="--" if form == "MimicNorm" else "-",
                        zorder=3 if form == "MimicNorm" else 2)
            ax.set_yscale(scale)
            ax.set_title(f"{arch}: {label}", fontsize=9)
            ax.set_xlabel("layer (ReLU inputs, then logits)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_last_bn(table: pd.DataFrame, path: Path) -> None:
    """Running variance, logits' std and loss by step, one line per peak lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("running_var", "last BN running variance", "log"),
               ("logits_std", "logits' batch std (before the last BN)", "log"),
               ("loss", "training loss", "linear"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.3))
    for ax, (metric, label, scale) in zip(axes, metrics):
        for peak, curve in table.groupby("lr_peak"):
            ax.plot(curve["step"], curve[metric], label=f"lr {peak:g}")
        ax.set_yscale(scale)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", type=Path, default=None,
                   help="CIFAR-10 ImageFolder tree (train/, test/) or its .tar.gz; default: "
                        "generated images")
    p.add_argument("--archs", nargs="+", default=["resnet18", "vgg16"],
                   help="networks of the decorrelation diagnostic (full width)")
    p.add_argument("--samples", type=int, default=128, help="batch of the decorrelation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lastbn-arch", default="vgg16", help="network of the last-BN diagnostic")
    p.add_argument("--lastbn-lrs", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--lastbn-width", type=float, default=0.25)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3, help="epochs of the last-BN runs")
    p.add_argument("--warm", type=int, default=2, help="warm-up epochs of the last-BN runs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out-dir", type=Path, default=Path("runs/diagnostics"))
    return p


def load_images(args: argparse.Namespace) -> tuple[object, object, int]:
    """(training split, test split, class count) as `TensorImages`: the CIFAR-10 subset of
    --source, or generated images."""
    from Cifar.data_loader import load_tensors
    from Cifar.utils import get_args_parser as cifar_parser

    if args.source is None:
        flags = ["-ds", "synthetic", "--synthetic-size", str(args.batch_size * 4),
                 str(args.samples)]
    else:
        work = grid.work_dir_of(args.out_dir)
        root = grid.extracted_tree(args.source, work / "data")
        subset = grid.subset_tree(root, work / f"subset-{args.train_per_class}-all",
                                  {"train": args.train_per_class, "test": 0})
        flags = ["-ds", "folder", "--data-dir", str(subset), "-j", "0"]
    cifar_args = cifar_parser().parse_args(["-a", "resnet18", *flags])
    train, test = load_tensors(cifar_args, train=True), load_tensors(cifar_args, train=False)
    return train, test, len(train.classes)


def main(argv: list[str] | None = None) -> int:
    """Write both diagnostics; returns the exit code."""
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        train, test, num_classes = load_images(args)
    except grid.StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    images, _ = test.batch(order[:args.samples])
    table = decorrelation(args.archs, images, num_classes, args.seeds)
    write_csv(table, args.out_dir / "decorrelation.csv")
    plot_decorrelation(table, args.out_dir / "decorrelation.png")

    per_epoch = len(train) // args.batch_size

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
        for i in range(per_epoch):
            yield train.batch(perm[i * args.batch_size:(i + 1) * args.batch_size], seed=0,
                              epoch=epoch)

    dynamics = last_bn_dynamics(args.lastbn_arch, args.lastbn_lrs, batches,
                                args.epochs * per_epoch, args.warm * per_epoch, num_classes,
                                width=args.lastbn_width)
    write_csv(dynamics, args.out_dir / "lastbn.csv")
    plot_last_bn(dynamics, args.out_dir / "lastbn.png")
    print(f"wrote {args.out_dir}/decorrelation.csv, decorrelation.png, lastbn.csv, lastbn.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
