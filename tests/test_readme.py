"""The README and docs/ against the code: their flag tables against the parsers, their command
lines parse, their Python examples run, their links resolve, and no page names a path of the
machine it was written on. A renamed flag or a moved page fails here."""
from __future__ import annotations

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from torch.distributed.run import get_args_parser as torchrun_parser

from Cifar.utils import get_args_parser as cifar_parser
from experiments import summarize
from ImageNet.folder2lmdb import get_args_parser as folder2lmdb_parser
from ImageNet.utils import get_args_parser as imagenet_parser
from tests.helpers import CLASSES, PER_CLASS, REPO, make_image_folder

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEXT = {page.relative_to(REPO).as_posix(): page.read_text() for page in PAGES}
# the pages that document the entry points' own flags
TRAINING_PAGES = ("README.md", "docs/training.md", "docs/long-runs.md", "docs/imagenet.md")
# flags of other tools named on those pages
OTHER_TOOLS = {"--logdir", "--dist"}  # tensorboard; pytest-xdist (the test command)
# "python <script>" / "python -m <module>" -> the module whose get_args_parser() parses it
SCRIPT_MODULES = {
    "main.py": "Cifar.utils",  # the README's `cd Cifar && python main.py`
    "Cifar/main.py": "Cifar.utils",
    "ImageNet/main.py": "ImageNet.utils",
    "ImageNet/folder2lmdb.py": "ImageNet.folder2lmdb",
    "scripts/device_check.py": "scripts.device_check",
    "scripts/readme_figure.py": "scripts.readme_figure",
}
# scripts whose command line is not a module-level get_args_parser(): not checked here
UNCHECKED_SCRIPTS = {"scripts/model_table.py", "scripts/convert_torchvision.py",
                     "benchmarks/lmdb_throughput.py"}
COMMAND = re.compile(r"(?:python3?|torchrun(?: [^\n`|]*?)?) "  # the launcher,
                     r"(-m [\w.]+|[\w/]+\.py)"  # the module or script,
                     r"((?:(?! >)[^\n`#|;&])*)")  # its arguments, up to a comment or redirection


def _options(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}


def _table_rows(text: str) -> list[list[str]]:
    """The cells of the rows of the markdown table that starts `text`'s first table."""
    table = text[text.index("\n|") + 1:].split("\n\n", 1)[0]
    return [re.split(r"(?<!\\)\|", row)[1:-1] for row in table.splitlines()[2:]]


def _flags_in(cell: str) -> list[str]:
    return [name.split()[0] for name in re.findall(r"`([^`]+)`", cell)]


def _flag_table(page: str, heading: str) -> list[str]:
    """The option strings in the first column of the first table after `heading` on `page`."""
    section = TEXT[page].split(f"\n{heading}\n", 1)[1]
    return [flag for row in _table_rows(section) for flag in _flags_in(row[0])]


def _all_flag_tables() -> list[tuple[str, list[str]]]:
    """(page, flags) of every table whose first header cell is `flag`, on every page."""
    tables = []
    for page, text in TEXT.items():
        for start in [m.start() for m in re.finditer(r"\n\| flag \|", text)]:
            rows = _table_rows(text[start:])
            tables.append((page, [flag for row in rows for flag in _flags_in(row[0])]))
    return tables


def _commands() -> list[tuple[str, str, str]]:
    """(page, script or -m module, arguments) of every command line on every page."""
    found = []
    for page, text in TEXT.items():
        for script, args in COMMAND.findall(text.replace("\\\n", " ")):
            found.append((page, script.removeprefix("-m ").strip(), args.strip()))
    return found


def _parser_of(script: str):
    module = SCRIPT_MODULES.get(script)
    as_module = script.removesuffix(".py").replace("/", ".")  # experiments/x.py runs as -m too
    if module is None and re.fullmatch(r"(experiments|benchmarks)\.\w+", as_module):
        module = as_module
    return importlib.import_module(module).get_args_parser() if module else None


def test_cifar_flags_table_is_the_parser():
    table = _flag_table("docs/training.md", "## Flags")
    assert set(table) == _options(cifar_parser())
    assert len(table) == len(set(table))


def test_imagenet_flags_table_holds_its_own_flags():
    table = _flag_table("docs/imagenet.md", "## Flags")
    assert set(table) <= _options(imagenet_parser())
    assert _options(imagenet_parser()) - _options(cifar_parser()) <= set(table)
    assert "--loader" not in _options(imagenet_parser())  # the page says ImageNet has no --loader


def test_converter_flags_table_is_the_parser():
    table = _flag_table("docs/imagenet.md", "### Converter flags")
    assert set(table) == _options(folder2lmdb_parser())


def test_every_flag_table_row_is_a_flag():
    parsers = (cifar_parser, imagenet_parser, folder2lmdb_parser)
    known = set().union(*(_options(parser()) for parser in parsers))
    tables = _all_flag_tables()
    assert {page for page, _ in tables} >= {"docs/training.md", "docs/imagenet.md"}
    for page, flags in tables:
        assert flags and set(flags) <= known, page
        assert len(flags) == len(set(flags)), page


def test_command_lines_parse():
    commands = _commands()
    scripts = {script for _, script, _ in commands}
    assert {"Cifar/main.py", "ImageNet/main.py", "ImageNet/folder2lmdb.py", "main.py",
            "experiments.table1", "experiments.summarize", "benchmarks.memory"} <= scripts
    for page, script, args in commands:
        if script == "pytest" or script in UNCHECKED_SCRIPTS:
            continue
        parser = _parser_of(script)
        assert parser is not None, f"{page}: no parser known for {script}"
        try:
            parser.parse_args(shlex.split(args))
        except SystemExit:
            pytest.fail(f"{page}: command does not parse: {script} {args}")


def test_no_flag_the_command_line_lacks():
    """Every `--flag` the training pages name exists in the parser of an entry point, the
    converter or torchrun (paragraphs about scripts/device_check.py name its own)."""
    parsers = (cifar_parser, imagenet_parser, folder2lmdb_parser, torchrun_parser)
    known = set().union(*(_options(parser()) for parser in parsers)) | {"--help"} | OTHER_TOOLS
    for page in TRAINING_PAGES:
        paragraphs = [text for text in TEXT[page].split("\n\n") if "device_check" not in text]
        mentioned = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]+)", "\n\n".join(paragraphs)))
        assert mentioned - known == set(), page


def _python_blocks() -> list[tuple[str, int, str]]:
    return [(page, k, block) for page, text in TEXT.items()
            for k, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S))]


def test_the_pages_hold_python_examples():
    pages = {page for page, _, _ in _python_blocks()}
    assert {"README.md", "docs/training.md", "docs/your-network.md", "docs/imagenet.md",
            "docs/method.md"} <= pages


@pytest.mark.parametrize("page, index, block", _python_blocks(),
                         ids=[f"{page}-{k}" for page, k, _ in _python_blocks()])
def test_python_examples_run(page, index, block, tmp_path, monkeypatch, capsys):
    """Each example runs as written, in an empty folder ("path/to/mimicnorm" is this clone; an
    example that reads train.lmdb gets one converted from a small ImageFolder tree)."""
    monkeypatch.chdir(tmp_path)
    block = block.replace("path/to/mimicnorm", str(REPO))
    if "train.lmdb" in block:
        from ImageNet import folder2lmdb
        tree = make_image_folder(tmp_path / "train")
        assert folder2lmdb.main(["--src", str(tree), "--dst", "train.lmdb", "--quiet"]) == 0
    namespace: dict = {}
    exec(compile(block, f"{page} example {index}", "exec"), namespace)
    if "train.lmdb" in block:  # the reader example of the format: what it read is the tree
        assert namespace["meta"]["classes"] == list(CLASSES)
        labels = [label for label in range(len(CLASSES)) for _ in range(PER_CLASS)]
        assert namespace["labels"].tolist() == labels
        assert namespace["jpeg_bytes"] == (tree / CLASSES[0] / "000.jpg").read_bytes()


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


def test_every_relative_link_resolves():
    pages = [*PAGES, *sorted((REPO / "results").glob("**/README.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: {target}"
            assert resolved.exists(), f"{where}: no such file"
            if anchor and resolved.suffix == ".md":
                assert anchor in _anchors(resolved), f"{where}: no such heading"
            checked += 1
    assert checked > 50


def _committed(*paths: str) -> list[Path]:
    """The files git tracks under `paths` (every file there when this is not a git clone)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=REPO,
                                capture_output=True, check=True).stdout.decode()
        files = [REPO / name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        files = [f for p in paths for f in ([REPO / p] if (REPO / p).is_file()
                                            else (REPO / p).rglob("*")) if f.is_file()]
    return [f for f in files if f.is_file()]


def test_no_committed_file_names_a_path_of_this_machine():
    files = _committed("README.md", "docs", "results")
    assert REPO / "README.md" in files and REPO / "results/table1/summary.csv" in files
    machine_path = re.compile(rb"(?<![\w.~-])/(?:tmp|work|root|home)/")
    offenders = [str(f.relative_to(REPO)) for f in files if machine_path.search(f.read_bytes())]
    assert offenders == []


def test_every_results_folder_says_what_it_is():
    folders = sorted({f.relative_to(REPO / "results").parts[0]
                      for f in _committed("results") if f.parent != REPO / "results"})
    assert "table1" in folders
    for folder in folders:
        readme = REPO / "results" / folder / "README.md"
        assert readme.is_file(), f"results/{folder}/ has no README.md"
        text = readme.read_text()
        assert re.search(r"python3? (-m |scripts/)", text), f"results/{folder}: no command"
        assert re.search(r"\b(CPU|GPU)\b", text), f"results/{folder}: no machine"


def test_ci_runs_the_readmes_test_command():
    quick_start = TEXT["README.md"].split("## Quick start", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"^(python -m pytest[^#\n]*?)\s+# 3\. test", quick_start, re.M)
    assert command, "the README's quick start lost its test command"
    ci_lines = (REPO / ".ci/run").read_text().splitlines()
    assert command.group(1) in ci_lines


def _quoted_table(text: str, header: str) -> list[str]:
    """The lines of the markdown table in `text` that starts with `header`, header included."""
    return text[text.index(header):].split("\n\n", 1)[0].splitlines()


@pytest.mark.parametrize("folder, header", [
    ("table1", "| arch | BN | MimicNorm | NoNorm | MimicNorm − BN best |"),  # summarizer's table
    ("table2", "| lr | None | None (paper) |"),  # lr_robustness's learning-rate table
])
def test_quoted_table_is_the_committed_one(folder, header):
    """The table rows quoted on the pages are those the study wrote to its table.md."""
    committed = set((REPO / "results" / folder / "table.md").read_text().splitlines())
    for page in (REPO / "docs/reproduction.md", REPO / "results" / folder / "README.md"):
        rows = _quoted_table(page.read_text(), header)
        assert len(rows) == 8 and set(rows) <= committed, page


CONVERGED = REPO / "results/table1_converged"


@pytest.fixture(scope="module")
def converged_runs():
    """Every committed run of the 60-epoch study, one row per run and epoch."""
    runs, problems = summarize.load_runs(CONVERGED / "runs")
    assert problems == []
    return runs


def test_converged_study_outputs_are_the_summarizers_over_its_committed_cells(converged_runs):
    """results/table1_converged's runs.parquet and table.md are what `experiments.summarize`
    writes from the committed cells, so neither went stale when a cell was added."""
    pd.testing.assert_frame_equal(pd.read_parquet(CONVERGED / "runs.parquet"), converged_runs)
    expected = summarize.markdown_report(summarize.summarize(converged_runs), converged_runs)
    assert (CONVERGED / "table.md").read_text() == expected


def test_converged_table_rows_are_what_its_committed_cells_give(converged_runs):
    """docs/reproduction.md's 60-epoch table is the summarizer's over the committed cells, every
    (arch, variant) with its three seeds ended, one row per network, and its train column
    ("train top-1 BN / MimicNorm / ...") their last-epoch train top-1."""
    runs = converged_runs
    ended = runs[runs["finished"] | runs["diverged"]].groupby(["arch", "variant"])["seed"]
    assert set(ended.nunique()) == {3}
    summary = summarize.summarize(runs)
    table = summarize.arch_table(summary, with_paper=False).set_index("arch")
    train = summary.set_index(["arch", "variant"])["train_last_mean"]
    lines = _quoted_table(TEXT["docs/reproduction.md"], "| arch | BN | MimicNorm |")
    *columns, train_column = [c.strip() for c in lines[0].strip("|").split("|")]
    assert train_column.startswith("train top-1 ") and len(lines) == 2 + len(table)
    train_variants = train_column.removeprefix("train top-1 ").split(" / ")
    for line in lines[2:]:
        arch, *cells, train_cell = [c.strip() for c in line.strip("|").split("|")]
        for column, cell in zip(columns[1:], cells, strict=True):
            assert cell == table.loc[arch, column], (arch, column)
        for variant, value in zip(train_variants, train_cell.split(" / "), strict=True):
            expected = f"{train[arch, variant]:.1f}" if (arch, variant) in train.index else "-"
            assert value == expected, (arch, variant)


def test_readme_is_short_and_opens_with_the_result_and_the_map():
    lines = TEXT["README.md"].splitlines()
    assert len(lines) <= 200
    first_screen = "\n".join(lines[:25])
    assert "](results/figure.png)" in first_screen and "](docs/training.md)" in first_screen
    assert (REPO / "results/figure.png").is_file()
