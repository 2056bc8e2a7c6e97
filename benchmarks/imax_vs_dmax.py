"""DMAX vs IMAX vs pseudo-IMAX on a synthetic world, at the same label budget.

Four tasks (grade, objects, segmentation, detection) and ``--per-task`` real labels per task:

``dmax``          each task labels its own ``per_task`` images (``4 * per_task`` images in all);
                  one loader per task, one encoder pass per task and step.
``imax``          the first ``per_task`` of those images carry all four labels; image-centric
                  batches, one encoder pass per step.
``pseudo_imax``   the paper's three stages: (1) the ``dmax`` model; (2) its heads label the
                  other tasks' images (:func:`umedpt.commands.pseudo.pseudo_label`, default
                  thresholds); (3) a fresh model trains image-centrically on real + pseudo labels
                  (``--pseudo-weight``).

Every variant trains the quick recipe's tiny Swin (64 px, ``--lr``) for ``--steps`` optimizer
steps with ``--batch-size`` images per task and step, so each task sees the same number of
labelled samples. The default world is ``fluorescence``, whose tasks a tiny model learns within
a few hundred steps (on ``radiograph`` most metrics stay at chance level at this budget). Then, on held-out test images: the
heads' metrics (grade accuracy, objects macro AUROC, segmentation Dice, detection mAP@0.5),
and linear probes of the frozen encoder (logistic regression on ``embed()``, fitted on the
validation images) for the held-out families ``count_bin`` and ``size_bin``; ``random`` is the
untrained encoder. Pseudo-label quality is measured against the world's true labels.

    python benchmarks/imax_vs_dmax.py                  # about 10 minutes on 2 CPU cores
    python benchmarks/imax_vs_dmax.py --seeds 0 1 2    # training seeds (the world stays the same)
    python benchmarks/imax_vs_dmax.py --seeds 0 1 2 --variants dmax imax --fisher --name imax_vs_dmax_fisher_cpu

Writes ``benchmarks/results/imax_vs_dmax_cpu.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import device_name, load_recipe, markdown_table, write_result

from umedpt import SwinEncoder
from umedpt.commands.pseudo import Thresholds, pseudo_label
from umedpt.data.imax import (
    ImageCentricDataModule,
    ImageRecord,
    annotation_counts,
    dmax_view,
    imax_view,
    read_manifest,
    synthetic_tasks,
    write_manifest,
    write_synthetic_world,
)
from umedpt.data.readers import read_image
from umedpt.image_centric import ImageCentricModule
from umedpt.testing import quiet_trainer

TASKS = ("grade", "objects", "segmentation", "detection")
HEAD_METRICS = {
    "grade": "accuracy",
    "objects": "auroc",
    "segmentation": "dice",
    "detection": "map_50",
}
PROBES = ("count_bin", "size_bin")


def fresh_model(args: argparse.Namespace, seed: int) -> ImageCentricModule:
    """The quick recipe's encoder and heads for the four tasks, initialised from ``seed``."""
    from lightning import seed_everything

    seed_everything(seed, verbose=False)
    cfg = load_recipe("quick")["model"]
    return ImageCentricModule(
        tasks=synthetic_tasks(args.style, {t: t for t in TASKS}, batch_size=args.batch_size),
        encoder=SwinEncoder(**cfg["encoder"]["init_args"]),
        head_defaults=cfg["head_defaults"],
        lr=args.lr,
        export_encoder=False,
        pseudo_weight=args.pseudo_weight,
    )


def train(
    manifest: Path, sampling: str, args: argparse.Namespace, seed: int
) -> tuple[ImageCentricModule, float, dict[str, Any] | None]:
    """Fit a fresh model on ``manifest``; return it, the training seconds and (with ``--fisher``)
    the Fisher spectrum summaries at IMAX's four phases, measured on the validation images
    (the same for every variant)."""
    from umedpt.diagnostic_callbacks import FisherSpectrumCallback

    model = fresh_model(args, seed)
    tasks = list(model.tasks.values())
    data = ImageCentricDataModule(
        str(manifest), tasks, sampling=sampling, batch_size=args.batch_size, image_size=64, seed=seed
    )
    fisher = FisherSpectrumCallback(num_batches=args.fisher_batches, split="val", dirname=f"fisher_{sampling}_{seed}")
    callbacks = [fisher] if args.fisher else []
    start = time.perf_counter()
    quiet_trainer(max_steps=args.steps, callbacks=callbacks, default_root_dir=str(args.tmp)).fit(model, data)
    seconds = time.perf_counter() - start
    phases = None
    if args.fisher:
        phases = {
            label: {
                "step": r["step"],
                "all": {k: r["fisher"]["all"][k] for k in ("se", "rho")},
                "tasks": {t: {k: v[k] for k in ("se", "rho")} for t, v in r["fisher"].items() if t != "all"},
            }
            for label, r in fisher.results.items()
        }
    return model, seconds, phases


def evaluate(model: ImageCentricModule, world: Path) -> dict[str, float]:
    """Test-split head metrics and frozen-encoder linear probes (fitted on val, scored on test)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = ImageCentricDataModule(str(world), list(model.tasks.values()), image_size=64)
    metrics = quiet_trainer().test(model, data, verbose=False)[0]
    out = {task: float(metrics[f"test/{task}/{key}"]) for task, key in HEAD_METRICS.items()}
    records = data.load_records()
    builder = data.builder
    model.eval()
    features, labels = {}, {}
    with torch.no_grad():
        for split in ("val", "test"):
            rows = [r for r in records if r.split == split]
            images = torch.stack([builder.image(r)[0] for r in rows])
            features[split] = torch.cat([model.encoder.embed(x) for x in images.split(64)]).numpy()
            labels[split] = {p: np.array([r.annotations[p].label for r in rows]) for p in PROBES}
    for probe in PROBES:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        clf.fit(features["val"], labels["val"][probe])
        out[f"probe_{probe}"] = float(clf.score(features["test"], labels["test"][probe]))
    return out


def pseudo_quality(
    labelled: list[ImageRecord], truth: list[ImageRecord], root: Path
) -> dict[str, dict[str, float]]:
    """Per task: share of candidate images labelled, and agreement of the pseudo labels with the truth."""
    from torchvision.ops import box_iou

    true = {r.id: r for r in truth}
    quality: dict[str, dict[str, float]] = {}
    for task in TASKS:
        pseudo = [
            (r, r.annotations[task]) for r in labelled if task in r.annotations and r.annotations[task].pseudo
        ]
        candidates = (
            sum(1 for r in labelled if r.split == "train") - annotation_counts(labelled)[task]["real"]
        )
        agree = []
        for r, a in pseudo:
            t = true[r.id].annotations[task]
            if task == "grade":
                agree.append(float(a.label == t.label))
            elif task == "objects":
                agree.append(float(sorted(a.labels) == sorted(t.labels)))
            elif task == "segmentation":
                mask, gt = read_image(root / a.mask), read_image(root / t.mask)
                sure = mask != 255
                agree.append(float((mask[sure] == gt[sure]).mean()))
            else:  # precision: pseudo boxes that overlap a true box of the same class by IoU >= 0.5
                iou = box_iou(torch.tensor(a.boxes), torch.tensor(t.boxes).reshape(-1, 4))
                same = torch.tensor(a.box_labels)[:, None] == torch.tensor(t.box_labels)[None, :]
                agree.append(float(((iou >= 0.5) & same).any(dim=1).float().mean()) if len(t.boxes) else 0.0)
        quality[task] = {
            "coverage": round(len(pseudo) / candidates, 3),
            "agreement": round(statistics.mean(agree), 3) if agree else float("nan"),
        }
    return quality


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-task", type=int, default=64, help="real train labels per task")
    parser.add_argument(
        "--style", default="fluorescence", help="synthetic world (umedpt.data.synthetic.STYLES)"
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8, help="images per task and step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-images", type=int, default=128, help="validation (probe fit) and test images")
    parser.add_argument("--pseudo-weight", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["dmax", "imax", "pseudo_imax"],
                        choices=["dmax", "imax", "pseudo_imax"], help="trained variants (random is always evaluated)")
    parser.add_argument("--fisher", action="store_true",
                        help="Fisher spectral entropy / dominant ratio at the four phases (validation images)")
    parser.add_argument("--fisher-batches", type=int, default=4, help="batches per task of each Fisher measurement")
    parser.add_argument("--name", default="imax_vs_dmax_cpu", help="result file name")
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", message=r".*(does not have many workers|LeafSpec|smaller than the logging).*"
    )

    tmp = args.tmp = Path(tempfile.mkdtemp(prefix="imax_vs_dmax_"))
    counts = {"train": len(TASKS) * args.per_task, "val": args.eval_images, "test": args.eval_images}
    world = write_synthetic_world(tmp, args.style, counts, image_size=64)
    records = read_manifest(world)
    dmax = write_manifest(dmax_view(records, TASKS, args.per_task), tmp / "dmax.jsonl")
    imax = write_manifest(imax_view(records, TASKS, args.per_task), tmp / "imax.jsonl")

    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        runs.append(
            {"variant": "random", "seed": seed, "train_s": 0.0, **evaluate(fresh_model(args, seed), world)}
        )
        dmax_model, seconds, phases = train(dmax, "task", args, seed)
        if "dmax" in args.variants:
            runs.append({"variant": "dmax", "seed": seed, "train_s": seconds, **evaluate(dmax_model, world),
                         **({"fisher": phases} if phases else {})})  # fmt: skip
        if "imax" in args.variants:
            imax_model, seconds, phases = train(imax, "image", args, seed)
            runs.append({"variant": "imax", "seed": seed, "train_s": seconds, **evaluate(imax_model, world),
                         **({"fisher": phases} if phases else {})})  # fmt: skip
        if "pseudo_imax" in args.variants:
            # stage 2: the DMAX model's heads label the other tasks' images
            start = time.perf_counter()
            dm = ImageCentricDataModule(str(dmax), list(dmax_model.tasks.values()), image_size=64)
            labelled, _ = pseudo_label(
                dmax_model, dm.load_records(), dm.builder, tmp / f"masks_{seed}", Thresholds()
            )
            pseudo = write_manifest(labelled, tmp / f"pseudo_{seed}.jsonl")
            label_s = time.perf_counter() - start
            quality = pseudo_quality(labelled, records, tmp)
            # stage 3: a fresh model on real + pseudo labels, image-centric
            pseudo_model, seconds, phases = train(pseudo, "image", args, seed)
            row = {"variant": "pseudo_imax", "seed": seed, "train_s": seconds, **evaluate(pseudo_model, world)}
            runs.append({**row, "pseudo_label_s": round(label_s, 1), "pseudo": quality,
                         **({"fisher": phases} if phases else {})})  # fmt: skip
        for r in runs[-(1 + len(args.variants)):]:
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "fisher"}, flush=True)

    columns = [*TASKS, *(f"probe_{p}" for p in PROBES), "train_s"]
    table, summary = [], {}
    for variant in ("random", *args.variants):
        chosen = [r for r in runs if r["variant"] == variant]
        summary[variant] = {c: statistics.mean(r[c] for r in chosen) for c in columns}
        cells = []
        for c in columns:
            values = [r[c] for r in chosen]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.{0 if c == 'train_s' else 3}f}{spread}")
        table.append([variant, *cells])
    header = ["variant", "grade acc", "objects AUROC", "seg Dice", "det mAP50", "count_bin probe",
              "size_bin probe", "train s"]  # fmt: skip
    print("\n" + markdown_table(header, table))
    quality_rows = [
        [task, r["seed"], r["pseudo"][task]["coverage"], r["pseudo"][task]["agreement"]]
        for r in runs if r["variant"] == "pseudo_imax" for task in TASKS
    ]  # fmt: skip
    if quality_rows:
        print("\npseudo labels (coverage of candidate images, agreement with the true labels)\n")
        print(markdown_table(["task", "seed", "coverage", "agreement"], quality_rows))
    fisher_rows, fisher_summary = [], {}
    if args.fisher:
        for variant in args.variants:
            chosen = [r for r in runs if r["variant"] == variant]
            for phase in chosen[0]["fisher"]:
                cells = {}
                for key in ("se", "rho"):
                    for scope in ("all", "tasks"):
                        values = [
                            r["fisher"][phase]["all"][key] if scope == "all"
                            else statistics.mean(v[key] for v in r["fisher"][phase]["tasks"].values())
                            for r in chosen
                        ]  # fmt: skip
                        spread = statistics.stdev(values) if len(values) > 1 else 0.0
                        cells[f"{key}_{scope}"] = (statistics.mean(values), spread)
                fisher_summary.setdefault(variant, {})[phase] = {k: list(v) for k, v in cells.items()}
                fisher_rows.append([variant, phase, *(f"{m:.3f} ± {sd:.3f}" for m, sd in cells.values())])
        print("\nFisher information of the task gradients on the validation images (mean ± sd over seeds;"
              " 'all': every task's gradients together, 'tasks': mean of the per-task values)\n")
        print(markdown_table(["variant", "phase", "SE all", "SE tasks", "rho all", "rho tasks"], fisher_rows))
    write_result(
        args.name,
        {
            "benchmark": "imax_vs_dmax",
            "device": device_name("cpu"),
            "settings": {k: v for k, v in vars(args).items() if k != "tmp"},
            "budget": {
                "per_task_real_labels": args.per_task,
                "dmax_images": counts["train"],
                "imax_images": args.per_task,
            },
            "thresholds": vars(Thresholds()),
            "summary": summary,
            **({"fisher_summary": fisher_summary} if args.fisher else {}),
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
