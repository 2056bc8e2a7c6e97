"""Transfer evaluation of frozen encoders: linear probes, data-fraction sweeps, reports and plots.

``lightning probe -c configs/probe.yaml`` (or :func:`main`) probes one or more encoders on
downstream tasks at several fractions of their training split, with the random-init and
scratch@100% baselines, and writes ``report.json``, ``report.md`` and ``report.png``.
From Python: ``run_probe(ProbeSettings(encoders=..., tasks=...))``.
"""

from typing import Any

from umedpt.probe.encoders import RANDOM, ProbeError, load_encoders, weights_hash
from umedpt.probe.features import FeatureCache, Features, cached_features, extract
from umedpt.probe.linear import LinearProbe, evaluate, fit_linear_probe
from umedpt.probe.report import write_report
from umedpt.probe.run import FRACTIONS, ProbeSettings, run_probe
from umedpt.probe.subsets import stratified_subset
from umedpt.probe.train import TrainBudget, train_and_test

__all__ = [
    "FRACTIONS",
    "RANDOM",
    "FeatureCache",
    "Features",
    "LinearProbe",
    "ProbeError",
    "ProbeSettings",
    "TrainBudget",
    "cached_features",
    "evaluate",
    "extract",
    "fit_linear_probe",
    "load_encoders",
    "main",
    "run_probe",
    "stratified_subset",
    "train_and_test",
    "weights_hash",
    "write_report",
]


def __getattr__(name: str) -> Any:
    """``main`` (the ``umedpt probe`` command) lives in :mod:`umedpt.commands.probe`."""
    if name == "main":
        from umedpt.commands.probe import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
