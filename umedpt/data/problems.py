"""Problems found in task data, and the one family of errors raised for them.

Every problem names the file (or array element) and the field that is wrong, so a message like
``train/img_007.png: mask: size 60x64 differs from the image's 64x64`` tells the user exactly
what to fix. Readers raise :class:`DataError` for the first error of a sample; the data checker
(``umedpt data check``) collects all of them. The other data errors are DataErrors too:
``umedpt.data.imax.ManifestError`` (a malformed IMAX manifest entry) and
``umedpt.data.datamodule.TaskDataError`` (a task's dataset cannot be built), so
``except DataError`` catches every one of them (all are ``ValueError``s).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a sample or a dataset.

    Attributes:
        source: the file (or ``file.npz:train_images[3]``, ``labels.csv row 7``) the problem is in.
        field: what is wrong in it: ``image``, ``label``, ``mask``, ``boxes``, ``file``, ...
        message: a human-readable description with the offending values.
        severity: ``error`` (training would be wrong or crash) or ``warning``.
        index: the sample index in its split, when the problem belongs to one sample.
    """

    source: str
    field: str
    message: str
    severity: Severity = "error"
    index: int | None = None

    def __str__(self) -> str:
        return f"{self.source}: {self.field}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class DataError(ValueError):
    """A sample cannot be used; the message names the file and the field.

    Args:
        message: the full message (``str(problem)`` when built from a problem).
        problem: the structured problem, when there is one.
    """

    def __init__(self, message: str, problem: Problem | None = None) -> None:
        super().__init__(message)
        self.problem = problem

    @classmethod
    def of(cls, source: str, field: str, message: str, index: int | None = None) -> DataError:
        """A ``DataError`` carrying ``Problem(source, field, message)``."""
        problem = Problem(source, field, message, index=index)
        return cls(str(problem), problem)


def errors_only(problems: list[Problem]) -> list[Problem]:
    """The problems of severity ``error``."""
    return [p for p in problems if p.severity == "error"]


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'train'?)`` for the choice closest to a misspelt ``value``, else ``""``."""
    close = difflib.get_close_matches(value.lower(), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def mask_value_message(mask: Any, num_classes: int, ignore_index: int) -> str | None:
    """What is wrong with a class-index mask's values (None: every value is a class index or
    ``ignore_index``); names up to 8 of the wrong values."""
    import numpy as np

    mask = np.asarray(mask)
    bad = ((mask >= num_classes) | (mask < 0)) & (mask != ignore_index)
    if not bad.any():
        return None
    values = np.unique(mask[bad])[:8].tolist()
    return f"values {values} are not class indices 0..{num_classes - 1} nor ignore_index={ignore_index}"

