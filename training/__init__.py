"""The training engine shared by the CIFAR and ImageNet entry points.

`Cifar/main.py` and `ImageNet/main.py` each supply a `Recipe` (defaults of the command line) and a
`DataSource` (their datasets); everything else, from the train loop to checkpoints, lives here.
"""
from .checkpoint import CheckpointSaver, load_checkpoint, save_atomic
from .cli import Recipe, args_to_dict, check_args, get_args_parser
from .data import DataSource, ResumableSampler, SeededSamples, SyntheticImages, build_loaders
from .device_loader import CropFlipRotate, DeviceLoader, TensorImages
from .distributed import Runtime, SyncedBatchNorm1d, setup_runtime, sync_last_bn_, wrap_model
from .engine import EpochState, correct_topk, evaluate, train_one_epoch
from .errors import DataError, RunError, RunInterrupted, TrainingDiverged, UsageError
from .guard import StepGuard, StopSignals
from .logger import LOG_COLUMNS, CsvLog
from .runner import RunResult, main, run
from .schedule import WarmupMultiStepLR, lr_factor

__all__ = [
    "LOG_COLUMNS",
    "CheckpointSaver",
    "CropFlipRotate",
    "CsvLog",
    "DataError",
    "DataSource",
    "DeviceLoader",
    "EpochState",
    "Recipe",
    "ResumableSampler",
    "RunError",
    "RunInterrupted",
    "RunResult",
    "Runtime",
    "SeededSamples",
    "StepGuard",
    "StopSignals",
    "SyncedBatchNorm1d",
    "SyntheticImages",
    "TensorImages",
    "TrainingDiverged",
    "UsageError",
    "WarmupMultiStepLR",
    "args_to_dict",
    "build_loaders",
    "check_args",
    "correct_topk",
    "evaluate",
    "get_args_parser",
    "load_checkpoint",
    "lr_factor",
    "main",
    "run",
    "save_atomic",
    "setup_runtime",
    "sync_last_bn_",
    "train_one_epoch",
    "wrap_model",
]
