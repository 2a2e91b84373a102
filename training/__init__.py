"""The training engine shared by the CIFAR and ImageNet entry points.

`Cifar/main.py` and `ImageNet/main.py` each supply a `Recipe` (defaults of the command line) and a
`DataSource` (their datasets); everything else, from the train loop (`engine`, `trainer`) to
checkpoints (`checkpoint`), lives in this package's modules. The names below are what the entry
points, benchmarks and experiments use.
"""
from .checkpoint import load_checkpoint
from .cli import Recipe, get_args_parser
from .data import DataSource, ResumableSampler, SeededSamples, SyntheticImages, build_loaders
from .distributed import Runtime
from .errors import DataError, UsageError
from .runner import main, run
from .trainer import RunResult

__all__ = [
    "DataError",
    "DataSource",
    "Recipe",
    "ResumableSampler",
    "RunResult",
    "Runtime",
    "SeededSamples",
    "SyntheticImages",
    "UsageError",
    "build_loaders",
    "get_args_parser",
    "load_checkpoint",
    "main",
    "run",
]
