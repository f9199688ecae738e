"""Small CSV helpers (plain or gzip) that turn every malformation into a one-line DataError."""
from __future__ import annotations

import csv
import gzip
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from ..errors import DataError


@contextmanager
def _open_text(path: Path):
    try:
        if path.suffix == ".gz":
            fh = gzip.open(path, "rt", newline="", encoding="utf-8")
        else:
            fh = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"expected a file, found a directory: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        yield fh
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    finally:
        fh.close()


def iter_rows(path, required: Sequence[str], chunk: int = 200_000) -> Iterator[Tuple[List[str], List[List[str]]]]:
    """Yield (header, rows) chunks of a CSV, after checking the header has ``required`` columns."""
    path = Path(path)
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DataError(f"{path}: file is empty (no header row)")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(header)})")
        rows: List[List[str]] = []
        for row in reader:
            if not row:
                continue
            if len(row) < len(header):
                row = row + [""] * (len(header) - len(row))
            rows.append(row)
            if len(rows) >= chunk:
                yield header, rows
                rows = []
        yield header, rows


def read_columns(path, required: Sequence[str], optional: Sequence[str] = (), allow_empty: bool = False) -> Dict[str, List[str]]:
    """All rows of a CSV as {column: list of str} for the ``required`` + present ``optional`` columns."""
    path = Path(path)
    out: Dict[str, List[str]] = {}
    n = 0
    for header, rows in iter_rows(path, required):
        cols = [c for c in list(required) + list(optional) if c in header]
        for c in cols:
            j = header.index(c)
            out.setdefault(c, []).extend(r[j] for r in rows)
        n += len(rows)
    if n == 0 and not allow_empty:
        raise DataError(f"{path}: file has a header but no rows")
    return out


def to_int(values: Sequence[str], path, column: str, dtype=np.int64, minimum=None) -> np.ndarray:
    """Parse integers; an entry that is not an integer, does not fit ``dtype`` or
    lies below ``minimum`` -> DataError naming file, column, row and the rule."""
    info = np.iinfo(dtype)
    lo = info.min if minimum is None else max(int(minimum), info.min)
    try:
        out = np.asarray(values, dtype=np.int64) if len(values) else np.zeros(0, np.int64)
    except (ValueError, OverflowError):
        out = None
    if out is None:
        parsed = []
        for i, v in enumerate(values):
            try:
                x = float(v)
                if not np.isfinite(x) or x != int(x):
                    raise ValueError
            except (ValueError, OverflowError):
                raise DataError(f"{path}: column {column} row {i + 2} is not an integer: {v!r}") from None
            parsed.append(int(x))
        big = [i for i, x in enumerate(parsed) if not info.min <= x <= info.max]
        if big:
            raise DataError(f"{path}: column {column} row {big[0] + 2} is out of range "
                            f"({values[big[0]]!r} does not fit {np.dtype(dtype).name})")
        out = np.asarray(parsed, dtype=np.int64)
    bad = np.flatnonzero((out < lo) | (out > info.max))
    if bad.size:
        i = int(bad[0])
        rule = f">= {lo}" if out[i] < lo else f"<= {info.max}"
        raise DataError(f"{path}: column {column} row {i + 2} is out of range ({values[i]!r}; must be {rule})")
    return out.astype(dtype)
