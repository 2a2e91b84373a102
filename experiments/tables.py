"""Tables as files: a pandas DataFrame as CSV and as a GitHub markdown table."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd


def format_value(value: object, floatfmt: str | None = None) -> str:
    """Floats with `floatfmt`, by default 3 decimals below 10 and 1 otherwise; NaN as "-";
    anything else as `str`."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if floatfmt is not None:
            return format(value, floatfmt)
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(df: pd.DataFrame | Sequence[Mapping[str, object]],
                   floatfmt: str | None = None) -> str:
    """`df` (a DataFrame or a list of row dicts) as a GitHub markdown table, without its index."""
    df = pd.DataFrame(df)
    header = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(v, floatfmt) for v in row) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """`df` as CSV without its index, written as `csv.DictWriter` would (NaN as "nan", CRLF)."""
    df.to_csv(path, index=False, na_rep="nan", lineterminator="\r\n")


def write_table(df: pd.DataFrame, stem: Path, caption: str = "") -> None:
    """`<stem>.csv` and `<stem>.md` (the caption, a blank line and the markdown table)."""
    write_csv(df, stem.with_suffix(".csv"))
    text = markdown_table(df) + "\n"
    stem.with_suffix(".md").write_text(f"{caption}\n\n{text}" if caption else text)
