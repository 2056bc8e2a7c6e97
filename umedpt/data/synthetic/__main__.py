"""``python -m umedpt.data.synthetic``: the rendering speed per world and size on this machine."""

from __future__ import annotations

import time

import cv2
import torch

from umedpt.data.synthetic.labels import STYLES
from umedpt.data.synthetic.render import render_scene


def _benchmark(sizes: tuple[int, ...] = (64, 224), seconds: float = 1.0) -> None:
    """Print the rendering speed per style and size: images per CPU second on one thread."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    for size in sizes:
        for style in STYLES:
            render_scene(style, 0, 0, size)
            count, start = 0, time.process_time()
            while time.process_time() - start < seconds:
                render_scene(style, 0, count, size)
                count += 1
            print(f"{style:>12s} {size:4d}px: {count / (time.process_time() - start):7.0f} images/s")



_benchmark()
