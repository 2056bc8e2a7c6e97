"""Synthetic worlds: procedurally generated biomedical-like images with consistent labels.

This module is the library's embedded default data. It needs no files and no downloads: every
image is *synthetic*, rendered on the fly by numpy and OpenCV, so pipelines, tests and tutorials
run anywhere. The images only imitate the look of real modalities; nothing here is patient data.

Styles (imaging "worlds")
-------------------------
``radiograph``    grayscale chest-x-ray-like: dark lung fields, ribs, mediastinum; opacities.
``ct``            grayscale axial abdominal CT-slice-like: body ellipse, organs, spine; lesions.
``fluorescence``  fluorescence microscopy: dark background, glowing cells in colour channels.
``histology``     H&E-like: pink fibrous stroma, purple nuclei, glands, vessels.
``dermoscopy``    dermoscopy photo: skin, hairs, a pigmented lesion with dermoscopic structures.

Every style has ``NUM_OBJECT_TYPES`` (K = 4) object types that differ in shape (round, ring-like,
elongated, lobulated or spiculated), size, intensity or colour and texture (see ``OBJECT_NAMES``),
and a global image-level grade with three levels (see ``GRADE_NAMES``). The grade changes the
image's texture (reticular pattern, parenchymal mottling, debris, inflammatory cells, pigment
network and colour variegation) while exposure and stain vary at random, so the mean intensity
alone does not give it away.

Labels of a scene (:class:`Scene`)
----------------------------------
``mask``        (H, W) int64, 0 = background, ``t + 1`` = object type ``t``; objects may overlap
                and the one drawn later wins, exactly as in the image.
``boxes``       (n, 4) float32 ``xyxy`` in pixels: the tight box of each object's *visible* mask
                pixels, ``x2``/``y2`` exclusive (a single pixel at column 3 spans ``x1=3, x2=4``).
                Objects with fewer than ``MIN_VISIBLE_AREA`` visible pixels are not drawn at all.
``box_labels``  (n,) int64 object types in ``0 .. K-1``.
``labels``      the label families:

================  ==============  ==================================================================
family            kind            definition
================  ==============  ==================================================================
``grade``         classification  global grade, 0..2 (names in ``GRADE_NAMES``)
``objects``       multilabel      float32 (K,) 0/1 presence of each object type
``dominant``      classification  type with the largest total visible area; K ("none") if empty,
                                  so it has K + 1 classes; ties go to the lower type
``count``         (integer)       number of visible objects, ``len(boxes)``
``count_bin``     classification  ``count`` binned as 0-1, 2-3, 4-6, 7+ (``COUNT_BIN_EDGES``)
``size_bin``      classification  median over objects of sqrt(visible area) / image size, binned
                                  small / medium / large by ``SIZE_BIN_EDGES``; 0 if empty
================  ==============  ==================================================================

``count_bin`` and ``size_bin`` are held-out families for probing frozen encoders; pretraining uses
``grade``, ``objects``, ``dominant``, ``segmentation`` (the mask) and ``detection`` (the boxes).
About 6% of the scenes have no object.

Determinism
-----------
A scene is a pure function of ``(style, seed, index, size)``: all randomness comes from
``np.random.default_rng([seed, style_id, index])`` and no random draw depends on the size, so a
scene rendered at two sizes shows the same layout (objects are at least 2 pixels in radius, and
those left with fewer than ``MIN_VISIBLE_AREA`` visible pixels drop out, so tiny sizes may differ).
:class:`SyntheticTaskDataset` maps its splits to disjoint index ranges (``SPLIT_OFFSETS``), so
splits never share a scene, and all label families of a world share the same images.

Speed: rendering is vectorised, works on object-sized crops and draws smooth fields at low
resolution; one core renders roughly 1000-1400 images/s at 64 x 64 and 600-900 images/s at
224 x 224 depending on the style. ``python -m umedpt.data.synthetic`` prints the rates measured
on the current machine.

The package's modules: ``labels`` (worlds, label families, class names, :class:`Scene`),
``primitives`` (drawing helpers, outlines), ``styles`` (each world's background and objects),
``render`` (:func:`render_scene`) and ``dataset`` (:class:`SyntheticTaskDataset`); every name
is importable from ``umedpt.data.synthetic``.
"""

from umedpt.data.synthetic.dataset import SyntheticTaskDataset
from umedpt.data.synthetic.labels import (
    COUNT_BIN_EDGES,
    GRADE_NAMES,
    LABEL_FAMILIES,
    MAX_SIZE,
    MIN_SIZE,
    MIN_VISIBLE_AREA,
    NUM_OBJECT_TYPES,
    OBJECT_NAMES,
    SIZE_BIN_EDGES,
    SPLIT_OFFSETS,
    STYLES,
    Scene,
    class_names,
    num_classes,
)
from umedpt.data.synthetic.render import render_scene

__all__ = [
    "COUNT_BIN_EDGES",
    "GRADE_NAMES",
    "LABEL_FAMILIES",
    "MAX_SIZE",
    "MIN_SIZE",
    "MIN_VISIBLE_AREA",
    "NUM_OBJECT_TYPES",
    "OBJECT_NAMES",
    "SIZE_BIN_EDGES",
    "SPLIT_OFFSETS",
    "STYLES",
    "Scene",
    "SyntheticTaskDataset",
    "class_names",
    "num_classes",
    "render_scene",
]
