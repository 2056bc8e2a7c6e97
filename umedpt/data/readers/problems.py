"""The problems and errors of task data: they live in :mod:`umedpt.data.problems` (this path
keeps working)."""

from umedpt.data.problems import DataError, Problem, Severity, did_you_mean, errors_only

__all__ = ["DataError", "Problem", "Severity", "did_you_mean", "errors_only"]
