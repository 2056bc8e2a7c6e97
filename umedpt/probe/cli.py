"""Former home of the probe command line, now :mod:`umedpt.commands.probe`; names imported from
here keep working."""

from typing import Any


def __getattr__(name: str) -> Any:
    from umedpt.commands import probe

    return getattr(probe, name)
