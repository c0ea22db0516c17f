"""The one output-format option set shared by every command: ``--format csv|json|table`` and ``-o``.

A command builds an :class:`Output` (rows for CSV, a document for JSON, text for people) and hands it to
:func:`emit`; no command dispatches on the format itself. The rows are a DataFrame, or plain column lists
(:data:`Columns`) for the commands that must start fast (``dump``): those never import pandas for CSV.

The default format follows one rule (:func:`resolve_format`): a table for a person at a terminal; CSV when
stdout is piped or redirected, or with ``-o FILE`` (``-o FILE.json``: JSON); ``--format`` overrides it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..atomic import atomic_write

if TYPE_CHECKING:
    import pandas as pd

# Column name -> values (str, int, float or None), every column of one length: a table without pandas.
Columns = Mapping[str, Sequence[Any]]

FORMATS = ("csv", "json", "table")


@dataclass
class Output:
    """What a command produced, in the three shapes people ask for."""

    frame: pd.DataFrame | Columns
    document: Any = None  # JSON (or a callable making it); defaults to {"rows": records of frame}
    text: str | Callable[[], str] | None = None  # for people; defaults to the frame as an aligned table
    #: why a table cell shows "-" (a value that does not exist, e.g. no decode tokens to compare)
    na_note: str | None = None

    def render(self, fmt: str) -> str:
        if fmt == "csv":
            if isinstance(self.frame, Mapping):
                return columns_to_csv(self.frame)
            return frame_to_csv(self.frame)
        if fmt == "json":
            doc = self.document() if callable(self.document) else self.document
            if doc is None:
                doc = {"rows": frame_records(self._dataframe())}
            return json.dumps(doc, indent=1, default=_json_default, allow_nan=False) + "\n"
        if fmt == "table":
            if callable(self.text):
                return self.text()
            if self.text is not None:
                return self.text
            return frame_to_table(self._dataframe(), na_note=self.na_note)
        raise ValueError(f"unknown format {fmt!r}")

    def _dataframe(self) -> pd.DataFrame:
        if isinstance(self.frame, Mapping):
            import pandas as pd

            return pd.DataFrame(dict(self.frame))
        return self.frame


def _json_default(o: Any) -> Any:
    import numpy as np  # only here: plain-column outputs (dump) never import numpy

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        f = float(o)
        return None if math.isnan(f) else f
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def frame_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts with plain Python values (NaN/NA -> None) for JSON."""
    import pandas as pd

    out = df.astype(object).where(pd.notna(df), None)
    return out.to_dict(orient="records")


def frame_to_csv(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def columns_to_csv(cols: Columns) -> str:
    """CSV of plain columns, byte for byte what DataFrame.to_csv(index=False) writes for the same values
    (None as an empty field, minimal quoting, "\\n" line ends), without pandas.

    Fast path: each column becomes strings at C speed and rows are joined; when any field would need
    quoting (or there is one column, where csv quotes an empty field), the csv module writes it instead.
    """
    strs = [[k] + [x if type(x) is str else "" if x is None else str(x) for x in v] for k, v in cols.items()]
    joined = "\x00".join("\x00".join(c) for c in strs)
    if len(strs) > 1 and not any(ch in joined for ch in ',"\r\n'):
        return "".join(line + "\n" for line in map(",".join, zip(*strs)))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols.keys())
    w.writerows(zip(*cols.values()))
    return buf.getvalue()


NA_MARK = "-"


def _number(x: float) -> str:
    """Rounded for reading: 4 significant digits, whole numbers from 10,000 up."""
    return f"{x:.0f}" if abs(x) >= 1e4 else f"{x:.4g}"


def table_cells(df: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The frame as strings for a table: floats rounded, missing values as NA_MARK; and whether any was."""
    import pandas as pd

    out = {}
    missing = False
    for col in df.columns:
        s = df[col]
        na = s.isna().to_numpy()
        missing |= bool(na.any())
        if pd.api.types.is_float_dtype(s.dtype):
            cells = [NA_MARK if m else _number(float(v)) for v, m in zip(s.to_numpy(), na)]
        elif na.any():
            cells = [NA_MARK if m else str(v) for v, m in zip(s.astype(object).to_numpy(), na)]
        else:
            out[col] = s
            continue
        out[col] = pd.Series(cells, index=s.index, dtype=object)
    return pd.DataFrame(out, index=df.index), missing


def frame_to_table(df: pd.DataFrame, max_rows: int | None = None, na_note: str | None = None) -> str:
    """An aligned table for people: floats rounded; a missing value is shown as '-' and explained below
    the table (``na_note``: why it is missing; CSV leaves it empty, JSON writes null)."""
    if df.empty:
        return "(no rows)\n"
    shown = df if max_rows is None or len(df) <= max_rows else df.head(max_rows)
    cells, missing = table_cells(shown)
    text = cells.to_string(index=False)
    if max_rows is not None and len(df) > max_rows:
        text += f"\n... {len(df) - max_rows} more rows (use --format csv for all)"
    if missing:
        text += f"\n{NA_MARK} = {na_note or 'no value: there was nothing to compute it from'}"
    return text + "\n"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def to_stdout(path: str | os.PathLike[str] | None) -> bool:
    return path is None or str(path) == "-"


def resolve_format(fmt: str | None, path: str | os.PathLike[str] | None = None) -> str:
    """The one rule for the default format: ``--format`` if given; else with ``-o FILE`` JSON for a
    ``.json`` name and CSV otherwise; else a table when stdout is a terminal (a person reads it) and CSV
    when it is piped or redirected (a program reads it)."""
    if fmt:
        return fmt
    if not to_stdout(path):
        return "json" if str(path).lower().endswith(".json") else "csv"
    isatty = getattr(sys.stdout, "isatty", None)
    return "table" if isatty is not None and isatty() else "csv"


def say_wrote(path: str | os.PathLike[str], what: str = "") -> None:
    """One line on stderr for each file a command writes, so a person knows where the output went."""
    sys.stderr.write(f"wrote {path}{f' ({what})' if what else ''}\n")


def write_text(text: str, path: str | os.PathLike[str] | None) -> None:
    """Write to ``path`` atomically, or to stdout when path is None or '-'."""
    if path is None or to_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_write(path) as fh:
        fh.write(text)


def emit(output: Output, fmt: str | None, path: str | os.PathLike[str] | None) -> None:
    """Render in the format the rule gives and write it; a file written is announced on stderr."""
    fmt = resolve_format(fmt, path)
    write_text(output.render(fmt), path)
    if path is not None and not to_stdout(path):
        say_wrote(path, fmt)


FORMAT_HELP = ("csv, json or table (default: a table at a terminal; CSV when piped or with -o, JSON for "
               "-o FILE.json)")


def add_output_options(parser: Any, output: bool = True, what: str = "", extra: tuple[str, ...] = (),
                       extra_help: str = "") -> None:
    """--format (csv/json/table, plus a command's own ``extra`` formats) and -o FILE, unless the command's -o
    names a data file of its own (then --format is the format of the summary it prints). ``what``: what
    the output is, for --help."""
    parser.add_argument("--format", "-f", choices=FORMATS + tuple(extra), default=None,
                        help=(f"format of {what}: " if what else "output format: ") + FORMAT_HELP + extra_help)
    if output:
        parser.add_argument("-o", "--output", metavar="FILE", default=None,
                            help="write to FILE (atomically: temp file, then rename) instead of stdout")
