"""Transfer of the quick pretraining run over pretraining seeds x probe seeds, and the README table.

For each pretraining seed this runs the README's two transfer commands::

    lightning fit -c configs/umedpt.yaml -c configs/quick.yaml --seed_everything S ...
    lightning probe -c configs/probe.yaml -c configs/probe_quick.yaml --encoders '{pretrained: <S>, random: random}'

(each fit in its own process, timed), then pools the probe runs of every pretraining seed:
mean ± sd over pretraining seeds x probe seeds for the pretrained encoder, over probe seeds for
the random-init encoder and over the scratch runs. Writes ``benchmarks/results/transfer_quick_cpu.json``
and ``.md`` and replaces the table between the ``transfer-table`` markers of README.md.

    python benchmarks/transfer.py                      # 3 pretraining seeds (about 25 minutes on 2 cores)
    python benchmarks/transfer.py --pretrain-seeds 0   # one seed
    python benchmarks/transfer.py --reuse              # keep the runs already in runs/transfer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, markdown_table, recipe_tasks, write_result  # noqa: E402
from umedpt.curves import PRIMARY_METRIC as PRIMARY  # noqa: E402

RUNS = ROOT / "runs" / "transfer"
START, END = "<!-- transfer-table:start -->", "<!-- transfer-table:end -->"
VAL_START, VAL_END = "<!-- validation-table:start -->", "<!-- validation-table:end -->"


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` in the repository root with its output in ``log``; its wall time in seconds."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {proc.returncode}; see {log}")
    return time.perf_counter() - start


def pretrain(
    seed: int,
    reuse: bool,
    root: Path | None = None,
    configs: tuple[str, ...] = ("configs/umedpt.yaml", "configs/quick.yaml"),
    extra: tuple[str, ...] = (),
) -> tuple[Path, float | None]:
    """Fit ``configs`` with seed ``seed`` in its own process under ``root`` (default
    runs/transfer/pretrain_seed<S>); the exported encoder and the fit's seconds (``None`` when a
    finished run was reused)."""
    root = root or RUNS / f"pretrain_seed{seed}"
    encoder = root / "lightning_logs" / "version_0" / "encoder"
    if reuse and (encoder / "model.safetensors").is_file():
        return encoder, None
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    cmd = [sys.executable, "-m", "umedpt", "fit"]
    for config in configs:
        cmd += ["-c", config]
    cmd += [
        "--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed),
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra,
    ]
    seconds = run(cmd, root / "fit.log")
    return encoder, seconds


def probe(seed: int, encoder: Path, reuse: bool, cache: Path) -> dict[str, Any]:
    out = RUNS / f"probe_seed{seed}"
    reports = sorted(out.glob("version_*/report.json"))
    if reuse and reports:
        return json.loads(reports[-1].read_text())
    cmd = [
        sys.executable,
        "-m",
        "umedpt",
        "probe",
        "-c",
        "configs/probe.yaml",
        "-c",
        "configs/probe_quick.yaml",
        "--encoders",
        json.dumps({"pretrained": str(encoder), "random": "random"}),
        "--output_dir",
        str(out),
        "--cache_dir",
        str(cache),
        "--progress",
        "false",
    ]
    out.mkdir(parents=True, exist_ok=True)
    run(cmd, out / "probe.log")
    return json.loads(sorted(out.glob("version_*/report.json"))[-1].read_text())


def stats(values: list[float]) -> dict[str, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def pooled(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: pretrained/random at every fraction and scratch@100%, pooled over the reports."""
    tasks: dict[str, Any] = {}
    for name in reports[0]["tasks"]:
        per = {"pretrained": {}, "random": {}}
        scratch: list[float] = []
        for report in reports:
            task = report["tasks"][name]
            metric = task["metric"]
            for encoder in per:
                for entry in task["runs"][encoder]:
                    per[encoder].setdefault(entry["fraction"], []).append(entry["metrics"][metric])
            if task.get("scratch"):
                scratch += [r["metrics"][metric] for r in task["scratch"]["runs"]]
        first = reports[0]["tasks"][name]
        tasks[name] = {
            "metric": first["metric"],
            "n_train": first["n_train"],
            "n_per_fraction": first["n_per_fraction"],
            "data": first["data"]["init_args"],
            "fractions": {
                encoder: {repr(f): stats(v) for f, v in sorted(values.items())}
                for encoder, values in per.items()
            },
            "scratch": stats(scratch) if scratch else None,
            "scratch_budget": (first.get("scratch") or {}).get("budget"),
        }
    return tasks


def table(result: dict[str, Any]) -> str:
    rows = []
    gaps = []
    for name, task in result["tasks"].items():
        fractions = sorted(float(f) for f in task["fractions"]["pretrained"])
        low, high = repr(fractions[0]), repr(fractions[-1])
        pre, rnd = task["fractions"]["pretrained"], task["fractions"]["random"]
        gap = pre[low]["mean"] - rnd[low]["mean"]
        gaps.append(gap)
        scratch = task["scratch"]
        rows.append(
            [
                name,
                f"**{pre[low]['mean']:.3f} ± {pre[low]['sd']:.3f}**",
                f"{rnd[low]['mean']:.3f} ± {rnd[low]['sd']:.3f}",
                f"{gap:+.3f}",
                f"{pre[high]['mean']:.3f} ± {pre[high]['sd']:.3f}",
                f"{rnd[high]['mean']:.3f} ± {rnd[high]['sd']:.3f}",
                f"{scratch['mean']:.3f} ± {scratch['sd']:.3f}" if scratch else "-",
            ]
        )
    low_images = next(iter(result["tasks"].values()))["n_per_fraction"]
    first = min(low_images, key=float)
    header = [
        "task (test accuracy)",
        f"pretrained@{float(first):.0%} ({low_images[first]} images)",
        f"random@{float(first):.0%}",
        "gap",
        "pretrained@100%",
        "random@100%",
        "scratch@100%",
    ]
    seeds = result["pretrain_seeds"]
    fit = result["fit_seconds"]
    lines = [
        markdown_table(header, rows),
        "",
        f"Mean ± sd over {len(seeds)} pretraining seeds x {len(result['probe_seeds'])} probe seeds "
        f"(random: probe seeds; scratch: {result['scratch_runs']} runs); mean gap at "
        f"{float(first):.0%}: **{statistics.fmean(gaps):+.3f}**. "
        + (
            f"Pretraining took {stats(fit)['mean']:.0f} ± {stats(fit)['sd']:.0f} s per seed "
            f"(OMP_NUM_THREADS={result.get('omp_threads') or 'unset'}). "
            if fit
            else ""
        )
        + "Regenerate with `python benchmarks/transfer.py`.",
    ]
    return "\n".join(lines)


def final_validation(run_dir: Path) -> dict[str, float]:
    """The last logged value of every ``val/...`` scalar in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("val/")}


def validation(seeds: list[int]) -> dict[str, Any]:
    """The main job's final validation metrics per task over the pretraining seeds."""
    kinds = {t.name: t.kind for t in recipe_tasks("quick")}
    per_task: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        last = final_validation(RUNS / f"pretrain_seed{seed}" / "lightning_logs" / "version_0")
        for name in kinds:
            for metric in (PRIMARY[kinds[name]], "accuracy"):
                key = f"val/{name}/{metric}"
                if key in last:
                    per_task.setdefault(name, {}).setdefault(metric, []).append(last[key])
    tasks = {
        name: {"kind": kinds[name], **{m: stats(v) for m, v in metrics.items()}}
        for name, metrics in per_task.items()
    }
    auroc = [t["auroc"]["mean"] for t in tasks.values() if t["kind"] in ("classification", "multilabel")]
    dice = [t["dice"]["mean"] for t in tasks.values() if t["kind"] == "segmentation"]
    maps = [t["map_50"]["mean"] for t in tasks.values() if t["kind"] == "detection"]
    return {
        "tasks": tasks,
        "median_auroc": statistics.median(auroc),
        "min_auroc": min(auroc),
        "median_dice": statistics.median(dice),
        "min_map_50": min(maps),
    }


def validation_table(val: dict[str, Any], seeds: list[int]) -> str:
    rows = []
    for name, task in val["tasks"].items():
        metric = PRIMARY[task["kind"]]
        cell = f"{task[metric]['mean']:.3f} ± {task[metric]['sd']:.3f}"
        acc = task.get("accuracy")
        rows.append([name, task["kind"], metric, cell, f"{acc['mean']:.3f} ± {acc['sd']:.3f}" if acc else ""])
    return "\n".join(
        [
            markdown_table(["task", "kind", "metric", "validation", "accuracy"], rows),
            "",
            f"Mean ± sd over pretraining seeds {seeds}. Median AUROC over the classification and "
            f"multi-label tasks **{val['median_auroc']:.3f}** (lowest {val['min_auroc']:.3f}); median "
            f"segmentation Dice **{val['median_dice']:.3f}**; lowest detection mAP50 **{val['min_map_50']:.3f}**.",
        ]
    )


def update_readme(text: str, start: str = START, end: str = END) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--reuse", action="store_true", help="reuse finished fits and probes in runs/transfer"
    )
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    parser.add_argument("--cache-dir", type=Path, default=RUNS / "cache", help="feature cache of the probes")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    reports, fit_seconds = [], []
    for seed in args.pretrain_seeds:
        encoder, seconds = pretrain(seed, args.reuse)
        if seconds is not None:
            fit_seconds.append(seconds)
            print(f"pretraining seed {seed}: {seconds:.0f} s -> {encoder}", flush=True)
        reports.append(probe(seed, encoder, args.reuse, args.cache_dir))
        print(f"probe of pretraining seed {seed} done", flush=True)
    settings = reports[0]["settings"]
    result = {
        "benchmark": "transfer",
        "commands": [
            "lightning fit -c configs/umedpt.yaml -c configs/quick.yaml --seed_everything S --model.seed S --data.seed S",
            "lightning probe -c configs/probe.yaml -c configs/probe_quick.yaml",
        ],
        "pretrain_seeds": args.pretrain_seeds,
        "probe_seeds": settings["seeds"],
        "scratch_runs": settings["scratch_runs"],
        "fit_seconds": fit_seconds,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "tasks": pooled(reports),
        "validation": validation(args.pretrain_seeds),
    }
    write_result("transfer_quick_cpu", result)
    text = table(result)
    val_text = validation_table(result["validation"], args.pretrain_seeds)
    (RESULTS / "transfer_quick_cpu.md").write_text(
        text + "\n\n## Validation of the main job\n\n" + val_text + "\n"
    )
    print(val_text + "\n\n" + text)
    if not args.no_readme:
        update_readme(text)
        update_readme(val_text, VAL_START, VAL_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
