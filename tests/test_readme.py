"""The README's flags and commands against the real command lines: a renamed flag fails here."""
from __future__ import annotations

import re
import shlex

import pytest

from torch.distributed.run import get_args_parser as torchrun_parser

from Cifar.utils import get_args_parser as cifar_parser
from ImageNet.folder2lmdb import get_args_parser as folder2lmdb_parser
from ImageNet.utils import get_args_parser as imagenet_parser
from tests.helpers import REPO

README = (REPO / "README.md").read_text()


def _options(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}


def _flags_table() -> list[str]:
    """The option strings in the first column of the README's flag table."""
    table = README.split("### Flags", 1)[1].split("\n\n", 2)[1]
    first_cells = [re.split(r"(?<!\\)\|", row)[1] for row in table.splitlines()[2:]]
    return [name.split()[0] for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)]


def _commands() -> list[tuple[str, str]]:
    """(script, arguments) of every README command line that runs an entry point."""
    pattern = r"(?:python|--nproc_per_node \d+) ((?:Cifar/|ImageNet/)?main\.py) ([^\n`#]*)"
    return [(script, args.strip()) for script, args in re.findall(pattern, README)]


def test_every_training_flag_is_in_the_table_and_every_row_is_a_flag():
    table = _flags_table()
    assert set(table) == _options(cifar_parser())
    assert len(table) == len(set(table))


def test_imagenet_only_flags_are_documented():
    for flag in _options(imagenet_parser()) - _options(cifar_parser()):
        assert f"`{flag}" in README, flag


def test_readme_command_lines_parse():
    commands = _commands()
    assert {script for script, _ in commands} == {"main.py", "Cifar/main.py", "ImageNet/main.py"}
    for script, args in commands:
        parser = imagenet_parser() if script.startswith("ImageNet") else cifar_parser()
        try:
            parser.parse_args(shlex.split(args))
        except SystemExit:
            pytest.fail(f"README command does not parse: {script} {args}")


def test_no_flag_the_command_line_lacks():
    """Every `--flag` the training and ImageNet sections name exists in the parser of an entry
    point, the converter or torchrun (paragraphs about scripts/device_check.py name its own)."""
    parsers = (cifar_parser, imagenet_parser, folder2lmdb_parser, torchrun_parser)
    known = set().union(*(_options(parser()) for parser in parsers)) | {"--help"}
    sections = README.split("## Training on CIFAR")[1].split("### Convert once")[0]
    paragraphs = [text for text in sections.split("\n\n") if "device_check" not in text]
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]+)", "\n\n".join(paragraphs)))
    assert mentioned - known == set()


@pytest.mark.parametrize("section", ["## Models", "## MimicNorm in your own code"])
def test_python_examples_run(section):
    block = README.split(section, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, f"README {section}", "exec"), {})
