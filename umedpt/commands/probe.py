"""``lightning probe`` / ``umedpt probe``: the command line of :func:`umedpt.probe.run_probe`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from umedpt.probe.encoders import ProbeError
from umedpt.probe.run import ProbeSettings, run_probe


def build_parser() -> ArgumentParser:
    """The argument parser: every field of :class:`ProbeSettings`, plus ``-c/--config``."""
    parser = ArgumentParser(
        prog="lightning probe",
        description="Probe frozen encoders on downstream tasks at several training fractions "
        "(linear probes, head probes, fine-tuning) with random-init and scratch@100% baselines.",
        parser_mode="omegaconf",
    )
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="YAML config (e.g. configs/probe.yaml)"
    )
    parser.add_class_arguments(ProbeSettings, as_group=False)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Run a probe from command-line ``args``; return the exit status (2 for bad input)."""
    parser = build_parser()
    cfg = parser.parse_args(list(args) if args is not None else None)
    init = parser.instantiate_classes(cfg)
    values = {k: v for k, v in init.as_dict().items() if k != "config"}
    try:
        settings = ProbeSettings(**values)
        _, paths = run_probe(settings)
    except ProbeError as err:
        print(f"lightning probe: error: {err}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text())
    print("umedpt probe: report written to", ", ".join(str(p) for p in paths.values()))
    return 0
