"""The command line shared by the CIFAR and ImageNet entry points; they differ only in defaults."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import models

from .errors import UsageError


@dataclass(frozen=True)
class Recipe:
    """Dataset-specific defaults of the shared command line: the paper's recipe for the dataset."""

    family: str  # model registry family and weight-mean rule: "cifar" or "imagenet"
    datasets: tuple[str, ...]  # choices of -ds; the first is the default
    eval_split: str  # folder of the held-out split of -ds folder: "test" or "val"
    data_dir: str
    batch_size: int
    lr: float
    weight_decay: float
    epochs: int
    milestones: tuple[int, ...]
    gamma: float = 0.1
    warm: int = 2
    lr_batch: int | None = None  # lr is for this global batch and scales linearly; None: fixed
    momentum: float = 0.9
    workers: int = 4  # data-loading processes, at most one per available CPU
    synthetic_size: tuple[int, int] = (5000, 1000)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


SEED_LIMIT = 2**32  # torch's CPU generator and NumPy keep 32 bits: larger seeds would alias


def seed_int(text: str) -> int:
    """argparse type: a seed in 0..2**32-1 (the range in which seeds give distinct runs)."""
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in 0..{SEED_LIMIT - 1}, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None and False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def get_args_parser(recipe: Recipe, description: str) -> argparse.ArgumentParser:
    """The training command line with `recipe`'s defaults; entry points may add data flags to it."""
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    arch_names = models.list_models(recipe.family)
    p.add_argument("-a", "--arch", required=True, choices=arch_names, metavar="ARCH",
                   help=f"model name: {', '.join(arch_names)}")
    p.add_argument("--weight", choices=("none", "mean"), default="none",
                   help="'mean': weight-mean projection of the conv filters after every optimizer "
                        "step (with a _cbn arch this is MimicNorm)")
    p.add_argument("--width", type=positive_float, default=1.0,
                   help="multiply every hidden channel count by this (e.g. 0.25 for quick "
                        "studies); topology, init rules and the convs weight mean centres stay "
                        "those of the full-size network")

    data = p.add_argument_group("data")
    data.add_argument("-ds", "--dataset", choices=recipe.datasets, default=recipe.datasets[0],
                      help=f"'folder': train/ and {recipe.eval_split}/ ImageFolder trees under "
                           "--data-dir; 'synthetic': generated images, no files needed")
    data.add_argument("--data-dir", default=recipe.data_dir, help="where the dataset lives")
    data.add_argument("--synthetic-size", nargs=2, type=positive_int, metavar=("TRAIN", "TEST"),
                      default=list(recipe.synthetic_size), help="image counts of -ds synthetic")
    data.add_argument("-j", "--workers", type=non_negative_int,
                      default=min(recipe.workers, available_cpus()),
                      help=f"data-loading processes per training process: {recipe.workers}, "
                           "or the CPUs available if fewer")

    optim = p.add_argument_group("recipe")
    optim.add_argument("-b", "--batch-size", type=positive_int, default=recipe.batch_size,
                       help="images per optimizer step in each process (per process under "
                            "torchrun, split across GPUs under DataParallel)")
    optim.add_argument("-lr", "--lr", type=positive_float, default=None,
                       help=f"peak learning rate (SGD); default {recipe.lr:g}"
                            + (f" x global batch / {recipe.lr_batch} (global batch: -b x "
                               "torchrun processes)" if recipe.lr_batch else ""))
    optim.add_argument("-wd", "--weight-decay", type=non_negative_float,
                       default=recipe.weight_decay, help="weight decay of every parameter")
    optim.add_argument("--momentum", type=non_negative_float, default=recipe.momentum,
                       help="SGD momentum")
    optim.add_argument("--epochs", type=positive_int, default=recipe.epochs,
                       help="total training epochs")
    optim.add_argument("--warm", type=non_negative_int, default=recipe.warm,
                       help="epochs of per-iteration linear learning-rate warm-up")
    optim.add_argument("--milestones", nargs="+", type=positive_int,
                       default=list(recipe.milestones),
                       help="multiply the learning rate by --gamma once this many epochs are done")
    optim.add_argument("--gamma", type=positive_float, default=recipe.gamma,
                       help="learning-rate factor at each milestone")
    optim.add_argument("--seed", type=seed_int, default=0,
                       help="seed of initialisation, data order and augmentation (each sample "
                            "gets its own augmentation seed from seed, epoch and index)")

    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default="runs",
                     help="outputs go to OUT_DIR/ARCH/RUN_NAME/")
    run.add_argument("--run-name", default=None,
                     help="one folder name under OUT_DIR/ARCH/; default: "
                          "<dataset>-<weight>-s<seed>-<date-time>; with --resume, the "
                          "checkpoint's own folder")
    run.add_argument("--resume", metavar="PATH", default=None,
                     help="continue training from this checkpoint, even one saved mid-epoch "
                          "(e.g. RUN/last.pt; a run folder means its last.pt)")
    run.add_argument("--save-every", type=positive_int, default=None, metavar="N",
                     help="also checkpoint every N optimizer steps, as last.pt and a "
                          "step-NNNNNNNN.pt recovery file (default: only at epoch ends and on "
                          "SIGTERM/SIGINT)")
    run.add_argument("--keep-recovery", type=positive_int, default=2, metavar="K",
                     help="keep the K newest step-NNNNNNNN.pt recovery files")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels only (cuDNN/cuBLAS), for bit-exact GPU reruns; "
                          "CPU runs are reproducible without it")
    run.add_argument("--evaluate", action="store_true",
                     help="only test the --resume checkpoint on the test set")
    run.add_argument("--max-steps", type=positive_int, default=None,
                     help="at most this many optimizer steps per epoch and test batches per "
                          "evaluation (smoke runs)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bars (they are also off when stderr is not a terminal)")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write live curves for TensorBoard to RUN/tensorboard/ (rank 0): "
                          "loss and lr every --log-every steps, each epoch's log.csv row, the "
                          "last BN's running statistics; x is the global optimizer step")
    run.add_argument("--log-every", type=positive_int, default=50, metavar="N",
                     help="with --tensorboard, record the training loss and lr every N optimizer "
                          "steps")

    device = p.add_argument_group("device")
    device.add_argument("--gpu", nargs="+", type=int, default=None, metavar="ID",
                        help="GPU ids to use (default: all visible; several use DataParallel, "
                             "under torchrun process r uses the r-th); -1 forces the CPU")
    device.add_argument("--amp", nargs="?", const="bf16", choices=("bf16", "fp16"), default=None,
                        help="mixed precision: bf16 autocast (plain --amp), or fp16 autocast "
                             "with a gradient scaler, the fast kind on V100/RTX 20xx-class GPUs; "
                             "the last BN stays in float32")
    device.add_argument("--threads", type=positive_int, default=None, metavar="T",
                        help="torch threads for this process's math (default: torch's, one per "
                             "core); one per process when several runs share the cores")
    device.add_argument("--channels-last", action="store_true",
                        help="channels_last memory format for model and images")
    device.add_argument("--compile", action="store_true",
                        help="torch.compile the model (one device or torchrun; not DataParallel)")
    device.add_argument("--sync-lastbn", action="store_true",
                        help="under torchrun, compute the last BN's batch statistics over all "
                             "processes (default: per process, like the reference)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations that argparse cannot see; raises UsageError."""
    if list(args.milestones) != sorted(set(args.milestones)):
        raise UsageError(f"--milestones must be strictly increasing, got {args.milestones}")
    if args.run_name is not None:
        check_run_name(args.run_name)
    if args.evaluate and not args.resume:
        raise UsageError("--evaluate tests a checkpoint: give it with --resume PATH")
    if args.sync_lastbn and not models.is_mimicnorm_name(args.arch):
        raise UsageError(f"--sync-lastbn needs a MimicNorm (_cbn) model; {args.arch} has no "
                         "last BN")
    if args.gpu is not None and -1 in args.gpu and len(args.gpu) > 1:
        raise UsageError(f"--gpu -1 (CPU) cannot be combined with GPU ids, got {args.gpu}")


def check_run_name(name: str) -> None:
    """Refuse a --run-name that is not one folder name (it would write outside OUT_DIR/ARCH)."""
    separators = [s for s in (os.sep, os.altsep) if s]
    if name in ("", ".", "..") or "\0" in name or any(s in name for s in separators):
        raise UsageError(f"--run-name {name!r} is not a folder name: give one name (no "
                         f"{' or '.join(separators)}, not . or ..), the run goes to "
                         "OUT_DIR/ARCH/RUN_NAME")


def default_lr(recipe: Recipe, batch_size: int, processes: int) -> float:
    """The recipe's learning rate for `batch_size` images per step in each of `processes`
    (DataParallel splits one batch, so it counts as one process)."""
    if recipe.lr_batch is None:
        return recipe.lr
    return recipe.lr * batch_size * processes / recipe.lr_batch


def args_to_dict(args: argparse.Namespace) -> dict:
    """The flags as plain JSON/`weights_only`-safe values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
