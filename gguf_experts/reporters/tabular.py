"""The one output-format option set shared by every command: ``--format csv|json|table`` and ``-o``.

A command builds an :class:`Output` (rows for CSV, a document for JSON, text for people) and hands it to
:func:`emit`; no command dispatches on the format itself. The rows are a DataFrame, or plain column lists
(:data:`Columns`) for the commands that must start fast (``dump``): those never import pandas for CSV.
"""
from __future__ import annotations

import csv
import io
import json
import math
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
            return frame_to_table(self._dataframe())
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


def frame_to_table(df: pd.DataFrame, max_rows: int | None = None) -> str:
    if df.empty:
        return "(no rows)\n"
    if max_rows is None or len(df) <= max_rows:
        return df.to_string(index=False) + "\n"
    text = df.head(max_rows).to_string(index=False)
    return text + f"\n... {len(df) - max_rows} more rows (use --format csv for all)\n"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def write_text(text: str, path: str | None) -> None:
    """Write to ``path`` atomically, or to stdout when path is None or '-'."""
    if path is None or path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_write(path) as fh:
        fh.write(text)


def emit(output: Output, fmt: str, path: str | None) -> None:
    write_text(output.render(fmt), path)


def add_output_options(parser: Any, default: str = "csv", extra: tuple[str, ...] = (), extra_help: str = "") -> None:
    """--format (csv/json/table, plus a command's own ``extra`` formats) and -o."""
    parser.add_argument("--format", "-f", choices=FORMATS + tuple(extra), default=default,
                        help=f"output format (default: {default}){extra_help}")
    parser.add_argument("-o", "--output", metavar="FILE", default=None,
                        help="write to FILE (atomically: temp file, then rename) instead of stdout")
