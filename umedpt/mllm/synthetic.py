"""Instruction data generated from the synthetic worlds (the embedded default of the MLLM stage).

Every scene of :mod:`umedpt.data.synthetic` carries consistent labels, so each image yields one
instruction of each image task, all in lower case:

========== ================================================ ===============================
task       instruction (one template of the dataset's pool)  answer
========== ================================================ ===============================
``cls``    which pattern does this chest radiograph show:  ``reticular``
           clear, reticular or diffuse opacity?
``vqa``    is there a nodule in this image?                 ``yes`` / ``no`` (balanced)
``refer``  where is nodule?  (a type seen exactly once)     ``{<12><40><21><52>}``
``identify`` what is it in {<12><40><21><52>}?              ``nodule``
``caption`` describe this chest radiograph in detail.       templated findings report
``qa``     (no image) in which kind of image can a nodule  ``chest radiograph``
           be seen?
========== ================================================ ===============================

Records reference images as ``synthetic://<style>/<split>/<index>?size=<px>&seed=<seed>``; the
loader renders them on the fly, so nothing but JSONL is written. Datasets are named
``<style>-<task>`` (``synthetic-qa`` for the text-only questions); ``templates.json`` holds each
dataset's template pool, from which training re-draws the instruction of every sample.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from umedpt.data.synthetic import GRADE_NAMES, OBJECT_NAMES, SPLIT_OFFSETS, STYLES, Scene, render_scene
from umedpt.mllm.llm import text_words
from umedpt.mllm.prompts import IMAGE_PROMPT, TASK_IDENTIFIERS, fill_template, format_box

MODALITY: dict[str, str] = {
    "radiograph": "chest radiograph",
    "ct": "ct slice",
    "fluorescence": "fluorescence micrograph",
    "histology": "histology section",
    "dermoscopy": "dermoscopy image",
}
#: template pools per task; ``{modality}`` is filled per world, ``{}`` per sample
TEMPLATES: dict[str, tuple[str, ...]] = {
    "cls": (
        "which pattern does this {modality} show: {}?",
        "classify the overall pattern of this {modality}. options: {}.",
    ),
    "vqa": (
        "is there a {} in this image?",
        "does this {modality} show a {}?",
        "based on the image, respond to this question with yes or no: is a {} present?",
    ),
    "refer": (
        "{}",
        "give me the location of {}.",
        "where is {}?",
        "from this image, tell me the location of {}.",
        "the location of {} is",
        "could you tell me the location for {}?",
        "where can i locate the {}?",
    ),
    "identify": (
        "{}",
        "what object is in this location {}?",
        "identify the object present at this location {}.",
        "what is it in {}?",
        "describe this object in {}.",
        "this {} is",
        "the object in {} is",
    ),
    "caption": (
        "describe this {modality} in detail.",
        "what are the key findings in this {modality}?",
        "please write a report about the image.",
        "can you provide an analysis of this image?",
    ),
    "qa": (
        "in which kind of image can a {} be seen?",
        "if you are a doctor, please answer the following question briefly: which images show a {}?",
    ),
}
QA_DATASET = "synthetic-qa"
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_IRREGULAR = {"nucleus": "nuclei", "mass": "masses"}
_REPORT_WORDS = "overall pattern : . findings and , the largest finding is no focal"


def _name(raw: str) -> str:
    return raw.replace("_", " ")


def _plural(name: str, count: int) -> str:
    if count == 1:
        return name
    head, _, last = name.rpartition(" ")
    last = _IRREGULAR.get(last) or (last[:-1] + "ies" if last.endswith("y") else last + "s")
    return f"{head} {last}".strip()


def _options(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1]


def dataset_templates(style: str, task: str) -> list[str]:
    """The template pool of dataset ``<style>-<task>``."""
    return [t.replace("{modality}", MODALITY[style]) for t in TEMPLATES[task]]


def report(style: str, scene: Scene) -> str:
    """The templated findings report of a scene."""
    grade = _name(GRADE_NAMES[style][scene.labels["grade"]])
    counts = Counter(int(k) for k in scene.box_labels.tolist())
    if not counts:
        return f"overall pattern: {grade}. no focal findings."
    names = OBJECT_NAMES[style]
    parts = [f"{_NUMBERS[min(n, 10)]} {_plural(_name(names[k]), n)}" for k, n in sorted(counts.items())]
    findings = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    dominant = _name(names[scene.labels["dominant"]])
    return f"overall pattern: {grade}. findings: {findings}. the largest finding is the {dominant}."


def _record(
    dataset: str, task: str, query: str, answer: str, rng: random.Random, image: str | None, uid: str
) -> dict[str, Any]:
    templates = TEMPLATES[task] if dataset == QA_DATASET else dataset_templates(dataset.split("-")[0], task)
    return {
        "id": f"{dataset}/{uid}",
        "image": image,
        "task": task,
        "instruction": fill_template(rng.choice(templates), query),
        "answer": answer,
        "dataset": dataset,
        "query": query,
    }


def scene_records(
    style: str, split: str, index: int, size: int, seed: int, tasks: Sequence[str]
) -> list[dict[str, Any]]:
    """The instruction records of one scene for the image ``tasks`` (see the module table)."""
    scene = render_scene(style, seed, SPLIT_OFFSETS[split] + index, size)
    rng = random.Random(f"{seed}/{style}/{split}/{index}")
    uri = f"synthetic://{style}/{split}/{index}?size={size}&seed={seed}"
    names = [_name(n) for n in OBJECT_NAMES[style]]
    counts = Counter(int(k) for k in scene.box_labels.tolist())
    uid = f"{split}/{index}"
    records = []
    for task in tasks:
        query, answer = "", ""
        if task == "cls":
            grades = [_name(g) for g in GRADE_NAMES[style]]
            query, answer = _options(grades), grades[scene.labels["grade"]]
        elif task == "vqa":
            present = sorted(counts)
            absent = [k for k in range(len(names)) if k not in counts]
            ask_present = bool(present) and (not absent or rng.random() < 0.5)
            kind = rng.choice(present if ask_present else absent)
            query, answer = names[kind], "yes" if ask_present else "no"
        elif task == "refer":
            unique = [k for k, n in sorted(counts.items()) if n == 1]
            if not unique:
                continue
            kind = rng.choice(unique)
            box = scene.boxes[scene.box_labels.tolist().index(kind)]
            query, answer = names[kind], format_box(box.tolist(), size, size)
        elif task == "identify":
            if not counts:
                continue
            i = rng.randrange(len(scene.boxes))
            query, answer = format_box(scene.boxes[i].tolist(), size, size), names[int(scene.box_labels[i])]
        elif task == "caption":
            answer = report(style, scene)
        else:
            raise ValueError(f"scene_records: unknown image task {task!r}")
        records.append(_record(f"{style}-{task}", task, query, answer, rng, uri, uid))
    return records


def qa_records(split: str, count: int, seed: int, styles: Sequence[str]) -> list[dict[str, Any]]:
    """Text-only questions: which world shows an object type (answer: the world's modality)."""
    rng = random.Random(f"{seed}/qa/{split}")
    records = []
    for i in range(count):
        style = rng.choice(list(styles))
        name = _name(rng.choice(OBJECT_NAMES[style]))
        records.append(_record(QA_DATASET, "qa", name, MODALITY[style], rng, None, f"{split}/{i}"))
    return records


def generate_instructions(
    output_dir: str | Path,
    num_images: dict[str, int],
    styles: Sequence[str] = ("radiograph", "histology"),
    tasks: Sequence[str] = ("vqa", "refer", "identify", "caption", "cls", "qa"),
    image_size: int = 128,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``<split>.jsonl`` per split and ``templates.json`` into ``output_dir``.

    Args:
        output_dir: target directory (created).
        num_images: scenes per split per world, e.g. ``{"train": 200, "val": 20, "test": 40}``;
            ``qa`` gets as many questions as one world has scenes.
        styles: synthetic worlds (see ``umedpt.data.synthetic.STYLES``).
        tasks: task identifiers to generate.
        image_size: side of the rendered images (labels and boxes are taken at this size).
        seed: world seed (also seeds the template choices).

    Returns:
        The path of each split's JSONL file.
    """
    bad = [t for t in tasks if t not in TASK_IDENTIFIERS] + [s for s in styles if s not in STYLES]
    if bad:
        raise ValueError(f"generate_instructions: unknown tasks or styles {bad}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_tasks = [t for t in tasks if t != "qa"]
    paths = {}
    for split, count in num_images.items():
        records = [
            r
            for style in styles
            for i in range(count)
            for r in scene_records(style, split, i, image_size, seed, image_tasks)
        ]
        if "qa" in tasks:
            records += qa_records(split, count, seed, styles)
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    pools = {f"{s}-{t}": dataset_templates(s, t) for s in styles for t in image_tasks}
    if "qa" in tasks:
        pools[QA_DATASET] = list(TEMPLATES["qa"])
    (out / "templates.json").write_text(json.dumps(pools, indent=1) + "\n")
    return paths


def synthetic_vocabulary() -> list[str]:
    """Every word the generator can write (plus the prompt's), sorted: the demo tokenizer's vocabulary."""
    texts = [IMAGE_PROMPT.replace("<ImageHere>", " "), _REPORT_WORDS, "yes no", " ".join(_NUMBERS)]
    texts += [f"[{t}]" for t in TASK_IDENTIFIERS]
    texts += [t for pool in TEMPLATES.values() for t in pool]
    for style in STYLES:
        texts += [MODALITY[style], *(_name(g) for g in GRADE_NAMES[style])]
        texts += [_plural(_name(n), c) for n in OBJECT_NAMES[style] for c in (1, 2)]
    return sorted(text_words(texts))
