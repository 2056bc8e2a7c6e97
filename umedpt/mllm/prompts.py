"""Prompt format, task identifiers and the box text format of the instruction data.

A prompt reads ``<Img><ImageHere></Img> [task] {instruction}`` (text-only tasks drop the image
part); the image embeddings replace ``<ImageHere>``. Boxes are written ``{<x1><y1><x2><y2>}`` with
integer coordinates on a 0-100 grid of the image width and height.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

#: text-level task identifiers of Uni-Med
TASK_IDENTIFIERS: tuple[str, ...] = ("qa", "vqa", "caption", "refer", "identify", "cls")
#: tasks with an image, in the reference order (the hard router's expert of each task)
IMAGE_TASKS: tuple[str, ...] = ("vqa", "refer", "identify", "caption", "cls")
IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_PROMPT = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
#: side of the box grid
GRID = 100

Box = tuple[float, float, float, float]
_BOX = re.compile(r"\{?\s*<\s*(\d+)\s*>\s*<\s*(\d+)\s*>\s*<\s*(\d+)\s*>\s*<\s*(\d+)\s*>\s*\}?")


def build_prompt(task: str, instruction: str, has_image: bool = True, template: str = "{}") -> str:
    """The prompt text of one sample; ``template`` wraps it (e.g. ``"[INST] {} [/INST]"``)."""
    text = f"[{task}] {instruction.strip()}"
    if has_image:
        text = f"{IMAGE_PROMPT} {text}"
    return template.replace("{}", text)


def fill_template(template: str, query: str) -> str:
    """Put ``query`` at the ``{}`` of ``template`` (braces in ``query``, e.g. boxes, stay as they are)."""
    return template.replace("{}", query) if "{}" in template else f"{template} {query}".strip()


def sample_instruction(templates: Sequence[str], query: str, rng: random.Random) -> str:
    """One template of the pool, chosen by ``rng``, filled with ``query``."""
    return fill_template(rng.choice(list(templates)), query)


def _to_grid(value: float, size: float) -> int:
    return min(GRID, max(0, round(value / size * GRID)))


def format_box(box: Sequence[float], width: float, height: float) -> str:
    """``{<x1><y1><x2><y2>}`` of an ``xyxy`` pixel box in an image of ``width`` x ``height``."""
    if len(box) != 4:
        raise ValueError(f"format_box: expected 4 coordinates (x1, y1, x2, y2), got {list(box)}")
    x1, y1, x2, y2 = box
    cells = (_to_grid(x1, width), _to_grid(y1, height), _to_grid(x2, width), _to_grid(y2, height))
    return "{" + "".join(f"<{c}>" for c in cells) + "}"


def parse_box(text: str, width: float = GRID, height: float = GRID) -> Box | None:
    """The first ``{<x1><y1><x2><y2>}`` in ``text`` as an ``xyxy`` box in pixels, else ``None``.

    Braces and spaces are optional; values above the grid make the answer unparsable. With the
    default ``width = height = 100`` the box stays on the grid.
    """
    match = _BOX.search(text)
    if match is None:
        return None
    cells = [int(v) for v in match.groups()]
    if max(cells) > GRID:
        return None
    x1, y1, x2, y2 = cells
    return (x1 * width / GRID, y1 * height / GRID, x2 * width / GRID, y2 * height / GRID)
