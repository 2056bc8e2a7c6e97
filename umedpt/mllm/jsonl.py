"""JSON-lines files: one JSON object per line, errors naming the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl"]


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSON-lines file (line 1 is the first).

    Raises:
        ValueError: ``<file>:<line>: ...`` for a line that is not valid JSON or not a JSON object.
    """
    path = Path(path)
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:  # its own "line 1" counts within the line
            raise ValueError(f"{path}:{line_no}: not valid JSON: {err.msg} at column {err.colno}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        yield line_no, record
