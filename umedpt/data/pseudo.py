"""Former home of pseudo-labelling, now :mod:`umedpt.commands.pseudo` (it runs a trained model:
a command, not data). Names imported from here keep working."""

from typing import Any


def __getattr__(name: str) -> Any:
    from umedpt.commands import pseudo

    return getattr(pseudo, name)
