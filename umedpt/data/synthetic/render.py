"""Rendering one synthetic scene: :func:`render_scene`."""

from __future__ import annotations

import cv2
import numpy as np

from umedpt.data.synthetic.labels import (
    MAX_SIZE,
    MIN_SIZE,
    MIN_VISIBLE_AREA,
    STYLES,
    Scene,
    _check_choice,
    _check_int,
    _labels,
)
from umedpt.data.synthetic.primitives import _noise, _pixel_noise, _u
from umedpt.data.synthetic.styles import _STYLES, _instances, _layout, _measure, _paint


def render_scene(style: str, seed: int, index: int, size: int = 224) -> Scene:
    """Render scene ``index`` of the synthetic world ``(style, seed)`` at ``size`` x ``size`` pixels.

    Args:
        style: one of ``STYLES``.
        seed: non-negative world seed.
        index: non-negative scene index.
        size: image side in pixels, ``MIN_SIZE`` to ``MAX_SIZE``; objects scale with it.

    Returns:
        The :class:`Scene`; identical inputs give bit-identical outputs.
    """
    _check_choice("style", style, STYLES)
    seed = _check_int("seed", seed, 0)
    index = _check_int("index", index, 0)
    size = _check_int("size", size, MIN_SIZE, MAX_SIZE)
    spec = _STYLES[style]
    rng = np.random.default_rng([seed, STYLES.index(style), index])
    grade = int(3 * rng.random())
    planes, regions = spec.background(rng, size, grade)
    objects = _layout(rng, spec, regions, size)
    inst = _instances(objects, size)
    areas, boxes = _measure(objects, inst)
    if min(areas, default=MIN_VISIBLE_AREA) < MIN_VISIBLE_AREA:
        # removing objects only uncovers the others, so every remaining one stays large enough
        objects = [obj for obj, area in zip(objects, areas, strict=True) if area >= MIN_VISIBLE_AREA]
        inst = _instances(objects, size)
        areas, boxes = _measure(objects, inst)

    # global exposure / white balance, applied to the background planes and the object colours alike
    gain = spec.gain[0] + (spec.gain[1] - spec.gain[0]) * rng.random(spec.channels)
    offset = spec.offset * (2 * rng.random() - 1)
    for plane, g in zip(planes, gain.tolist(), strict=True):
        plane *= g
        plane += offset
    image = cv2.merge(planes) if spec.channels > 1 else planes[0][..., None]
    if objects:
        background = image.copy() if spec.relative else None
        texture = _noise(rng, 40, size)
        shift = 0.0 if spec.relative else offset
        cores, edges = ((gain * colours + shift).astype(np.float32) for colours in spec.colours)
        for obj in objects:
            _paint(image, background, obj, spec.looks[obj.kind], cores[obj.kind], edges[obj.kind], texture)
    image += _pixel_noise(rng, size, spec.channels) * np.float32(_u(rng, *spec.noise))
    np.clip(image, 0.0, 1.0, out=image)
    if spec.channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)

    kinds = [obj.kind for obj in objects]
    lut = np.zeros(256, np.uint8)
    lut[1 : len(objects) + 1] = np.add(kinds, 1)
    mask = cv2.LUT(inst, lut).astype(np.int64)
    return Scene(
        image,
        mask,
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(kinds, np.int64),
        _labels(grade, kinds, areas, size),
    )
