"""Does the connector-MoE help? CMoE (soft, sparse, hard, constant routers) vs the plain MLP connector.

Uni-Med reports that its connector mixture-of-experts improves the tasks by up to 8% over a plain
connector. For each connector and seed this fits the MLLM recipe on the embedded synthetic
instructions (``configs/mllm.yaml`` + ``configs/mllm_quick.yaml`` + ``configs/mllm_pretrained.yaml``:
192 training and 48 test scenes per world, 15 epochs, the same steps for every connector) on the
**pretrained** encoder (``--encoder``; by default the export of the quick main job, trained once
into ``runs/connector_quality/pretrain`` and reused), generates the answers of the test split
(greedy), scores them (``umedpt mllm-evaluate``'s functions, umedpt protocol) and measures the
tug-of-war of the image tasks at the connector (``umedpt diagnose``'s functions, 8 training
batches per task; count sketches for the CMoE, as ``diagnose`` chooses). Each run is its own
process with one thread (``OMP_NUM_THREADS=1``).

Per task the headline metric: closed-question accuracy for ``[vqa]`` and ``[cls]``, IoU for
``[refer]``, token F1 for ``[identify]``, ROUGE-L for ``[caption]``, exact match for ``[qa]``;
plus the final training and validation losses. Two plain references: ``mlp_random``, the MLP
connector on the random demo encoder (what the same recipe learns without pretraining), and the
most frequent answer (every question of a dataset answered with its most common reference
answer: what a model that ignores the image scores).

    python benchmarks/connector_quality.py                         # 5 connectors + mlp_random x seeds 0 1 2
    python benchmarks/connector_quality.py --connectors mlp soft --seeds 0
    python benchmarks/connector_quality.py --name connector_quality_real --encoder runs/.../encoder \
        --fit_args=--model.llm=/models/my-llm                        # any fit options

Writes ``benchmarks/results/<name>.{json,md,png}`` (default name ``connector_quality_cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, markdown_table, write_result  # noqa: E402
from benchmarks.transfer import stats  # noqa: E402

RUNS = ROOT / "runs" / "connector_quality"
#: name -> extra fit arguments
CONNECTORS: dict[str, list[str]] = {
    "mlp": ["--model.connector", "mlp"],
    "soft": ["--model.connector", "cmoe", "--model.router_type", "soft"],
    "sparse": ["--model.connector", "cmoe", "--model.router_type", "sparse"],
    "hard": ["--model.connector", "cmoe", "--model.router_type", "hard"],
    "constant": ["--model.connector", "cmoe", "--model.router_type", "constant"],
    "mlp_random": ["--model.connector", "mlp"],
}
#: connectors fitted on the random demo encoder instead of the pretrained one (plain references)
RANDOM_ENCODER = {"mlp_random"}
LABELS = {"mlp_random": "mlp, random encoder"}
#: the pretraining whose export is the default encoder: the README's quick main job
PRETRAIN = ["-c", "configs/umedpt.yaml", "-c", "configs/quick.yaml", "--trainer.enable_progress_bar", "false"]
#: task -> the metric of the task's row that the table reports
HEADLINE = {"vqa": "closed_accuracy", "cls": "closed_accuracy", "refer": "iou", "identify": "token_f1",
            "caption": "rougeL", "qa": "exact_match"}  # fmt: skip
#: the tasks that Δm averages: not ``[qa]`` (text-only: no image passes through a connector) and not
#: ``[refer]`` (no connector learns it at this budget, IoU < 0.01: ratios of values that close to 0
#: are noise)
DELTA_TASKS = ("vqa", "cls", "identify", "caption")
#: as ``umedpt diagnose``: full gradients up to 2 GiB, else count sketches (the 17.6 M-parameter
#: CMoE's 40 full gradients in float64 would take 5.6 GB)
SKETCH = "auto"
#: the recipe of ``configs/mllm_pretrained.yaml`` (192 training and 48 test scenes per world, 15
#: epochs); the encoder comes from ``--encoder``, the instructions go to the benchmark's folder
CONFIGS = ["-c", "configs/mllm.yaml", "-c", "configs/mllm_quick.yaml", "-c", "configs/mllm_pretrained.yaml",
           "--data.synthetic_dir", "runs/connector_quality/data"]  # fmt: skip


def last_scalar(run_dir: Path, tag: str) -> float | None:
    """The last value of a TensorBoard scalar of the run, or ``None``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag)[-1].value if tag in events.Tags()["scalars"] else None


def headline(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Task -> its headline metric, from the task's row over all its datasets."""
    pooled = {r["task"] for r in rows if r["dataset"] == "all"}
    chosen = {r["task"]: r for r in rows if r["dataset"] == "all" or r["task"] not in pooled}
    return {task: chosen[task][HEADLINE[task]] for task in HEADLINE if task in chosen}


def constant_answer(predictions: Path) -> dict[str, float]:
    """The headline metrics of answering every question of a dataset with its most frequent
    reference answer (the plain reference: what a model that ignores the image scores)."""
    from collections import Counter

    from umedpt.mllm.metrics import evaluate_records
    from umedpt.mllm.predictions import read_predictions

    records = read_predictions(predictions)
    common = {}
    for dataset in {r["dataset"] for r in records}:
        common[dataset] = Counter(r["answer"] for r in records if r["dataset"] == dataset).most_common(1)[0][0]
    return headline(evaluate_records([{**r, "prediction": common[r["dataset"]]} for r in records], meteor=False))


def pretrained_encoder(runs_dir: Path) -> Path:
    """The export of the quick main job in ``runs_dir/pretrain`` (fitted there first if absent)."""
    root = runs_dir / "pretrain"
    found = sorted(root.glob("lightning_logs/version_*/encoder/model.safetensors"))
    if not found:
        root.mkdir(parents=True, exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] pretraining the encoder: umedpt fit {' '.join(PRETRAIN)}", flush=True)
        with (root / "run.log").open("w") as log:
            subprocess.run([sys.executable, "-m", "umedpt", "fit", *PRETRAIN, "--trainer.default_root_dir", str(root)],
                           check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        found = sorted(root.glob("lightning_logs/version_*/encoder/model.safetensors"))
    return found[-1].parent


def one(connector: str, seed: int, batches: int, root: Path, encoder: str, fit_args: list[str]) -> dict[str, Any]:
    """Fit, generate, score and diagnose one connector and seed (in this process); ``encoder`` is
    an export path or ``random``."""
    from benchmarks.connector_interference import measure
    from umedpt.cli import main
    from umedpt.mllm.evaluate import evaluate

    if connector in RANDOM_ENCODER:
        encoder = "random"
    common = [*CONFIGS, *CONNECTORS[connector], "--model.encoder", "null" if encoder == "random" else encoder, "--seed_everything", str(seed), "--trainer.default_root_dir",
              str(root), "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *fit_args]  # fmt: skip
    start = time.perf_counter()
    cli = main(["fit", *common])
    fit_seconds = time.perf_counter() - start
    version = Path(cli.trainer.log_dir)
    diagnostics = measure(cli, batches, sketch_dim=SKETCH)
    checkpoint = sorted((version / "checkpoints").glob("*.ckpt"))[-1]
    main(["predict", *common, "--ckpt_path", str(checkpoint)])
    predictions = sorted(root.rglob("predictions.jsonl"), key=lambda p: p.stat().st_mtime)[-1]
    report = evaluate(str(predictions), output_dir=str(root / "evaluation"))
    return {
        "connector": connector,
        "seed": seed,
        "encoder": encoder,
        "command": "umedpt fit " + " ".join(common),
        "fit_seconds": fit_seconds,
        "parameters": diagnostics["num_parameters"],
        "train_loss": last_scalar(version, "train/loss_epoch"),
        "val_loss": last_scalar(version, "val/loss"),
        "metrics": headline(report["rows"]),
        "constant_answer": constant_answer(predictions),
        "rows": report["rows"],
        "tug_of_war": dict(zip(diagnostics["tasks"], diagnostics["tug_of_war"], strict=True)),
        "tug_of_war_mean": diagnostics["tug_of_war_mean"],
        "gd_offdiagonal_mean": diagnostics["gd_offdiagonal_mean"],
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    connectors = [c for c in CONNECTORS if any(r["connector"] == c for r in runs)]
    tasks = [t for t in HEADLINE if any(t in r["metrics"] for r in runs)]
    per: dict[str, Any] = {}
    for connector in connectors:
        chosen = [r for r in runs if r["connector"] == connector]
        per[connector] = {
            "seeds": sorted(r["seed"] for r in chosen),
            "parameters": chosen[0]["parameters"],
            "tasks": {t: stats([r["metrics"][t] for r in chosen if r["metrics"].get(t) is not None]) for t in tasks},
            **{k: stats([r[k] for r in chosen]) for k in ("train_loss", "val_loss", "tug_of_war_mean", "gd_offdiagonal_mean", "fit_seconds")},
        }  # fmt: skip
    if "mlp" in per:
        base = per["mlp"]["tasks"]
        for entry in per.values():
            changes = [(entry["tasks"][t]["mean"] - base[t]["mean"]) / base[t]["mean"]
                       for t in tasks if t in DELTA_TASKS and base[t]["mean"]]  # fmt: skip
            entry["delta_m_vs_mlp"] = 100.0 * statistics.fmean(changes) if changes else None
    constant = {t: stats([r["constant_answer"][t] for r in runs if t in r["constant_answer"]]) for t in tasks}
    return {"connectors": per, "constant_answer": constant, "tasks": tasks, "headline": {t: HEADLINE[t] for t in tasks},
            "delta_m_tasks": [t for t in tasks if t in DELTA_TASKS]}  # fmt: skip


def table(summary: dict[str, Any]) -> str:
    per, tasks = summary["connectors"], summary["tasks"]

    def cell(s: dict[str, float], digits: int = 3) -> str:
        return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"

    header = ["connector", "parameters", *(f"{t} ({HEADLINE[t]})" for t in tasks), "Δm vs mlp", "train loss", "val loss",
              "tug-of-war (mean)", "fit s"]  # fmt: skip
    rows = [[LABELS.get(c, c), f"{e['parameters'] / 1e6:.2f} M", *(cell(e["tasks"][t]) for t in tasks),
             f"{e['delta_m_vs_mlp']:+.1f}%" if e.get("delta_m_vs_mlp") is not None else "-",
             cell(e["train_loss"]), cell(e["val_loss"]), cell(e["tug_of_war_mean"]), f"{e['fit_seconds']['mean']:.0f}"]
            for c, e in per.items()]  # fmt: skip
    constant = summary["constant_answer"]
    rows.append(["most frequent answer", "-", *(cell(constant[t]) for t in tasks), "-", "-", "-", "-", "-"])
    return markdown_table(header, rows)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per, tasks = summary["connectors"], summary["tasks"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(per)
    for i, (connector, entry) in enumerate(per.items()):
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, [entry["tasks"][t]["mean"] for t in tasks], width, yerr=[entry["tasks"][t]["sd"] for t in tasks],
               capsize=2, label=LABELS.get(connector, connector))  # fmt: skip
    for j, t in enumerate(tasks):
        level = summary["constant_answer"][t]["mean"]
        ax.hlines(level, j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="--", lw=1,
                  label="most frequent answer" if j == 0 else None)  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], [f"{t}\n({HEADLINE[t]})" for t in tasks])
    ax.set_ylabel("test score, mean ± sd over seeds")
    ax.set_title("MLLM on the pretrained encoder: connector-MoE routers vs the MLP connector")
    ax.legend(title="connector", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connectors", nargs="+", default=list(CONNECTORS), choices=list(CONNECTORS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=8, help="training batches per task for the tug-of-war")
    parser.add_argument("--reuse", action="store_true", help="keep the runs already recorded in runs/connector_quality")
    parser.add_argument("--fit_args", action="append", default=[], help="one more option for fit and predict (repeatable)")
    parser.add_argument("--name", default="connector_quality_cpu", help="results file name (and run folder)")
    parser.add_argument("--encoder", help="pretraining export for the connectors (default: the quick main job's, "
                        "fitted into runs/connector_quality/pretrain once); 'random': the random demo encoder")  # fmt: skip
    parser.add_argument("--one", nargs=2, metavar=("CONNECTOR", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    runs_dir = RUNS if args.name == "connector_quality_cpu" else RUNS.parent / args.name
    if args.one:
        connector, seed = args.one[0], int(args.one[1])
        root = runs_dir / f"{connector}_seed{seed}"
        result = one(connector, seed, args.batches, root, args.encoder, args.fit_args)
        (root / "record.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for seed in args.seeds:
        for connector in args.connectors:
            root = runs_dir / f"{connector}_seed{seed}"
            record = root / "record.json"
            if not (args.reuse and record.is_file()):
                if args.encoder is None:  # fitted only when a connector run needs it
                    args.encoder = str(pretrained_encoder(RUNS))
                root.mkdir(parents=True, exist_ok=True)
                print(f"[{time.strftime('%H:%M:%S')}] {connector} seed {seed}", flush=True)
                with (root / "run.log").open("w") as log:
                    subprocess.run([sys.executable, __file__, "--batches", str(args.batches), "--name", args.name,
                                    "--encoder", args.encoder, "--one", connector, str(seed),
                                    *(f"--fit_args={a}" for a in args.fit_args)],
                                   check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            runs.append(json.loads(record.read_text()))
            print(f"  {connector} seed {seed}: {runs[-1]['metrics']}", flush=True)
    summary = summarise(runs)
    text = table(summary)
    print("\n" + text)
    name = args.name
    encoders = sorted({r["encoder"] for r in runs if r["connector"] not in RANDOM_ENCODER})
    (RESULTS / f"{name}.md").write_text(
        f"MLLM recipe of configs/mllm_pretrained.yaml per connector (encoder: {', '.join(encoders)}), test split, "
        f"umedpt protocol, mean ± sd over seeds {args.seeds}. Δm: the mean relative change of the headline "
        f"metrics vs the mlp connector over {', '.join(summary['delta_m_tasks'])}.\n\n{text}\n"
    )
    write_result(name, {"benchmark": "connector_quality", "settings": vars(args), **summary, "runs": runs})
    plot(summary, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
