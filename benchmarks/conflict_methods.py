"""Conflict-aware optimisation on the 17-task quick recipe: every method against ``sum``.

Each method is one ``umedpt fit -c configs/umedpt.yaml -c configs/quick.yaml`` with its options
added, at the recipe's budget of task batches (5000: one task per step for 5000 steps, or four
tasks per step for 1250), seeds 0/1/2, each fit in its own process with one thread
(``OMP_NUM_THREADS=1``, ``--jobs`` fits side by side, so all methods run under the same load).
Two groups:

- one task per step (the recipe: AdamW moments per task): ``sum`` and the methods that weigh a
  task's part of the step from its losses, ``dwa``, ``uncertainty``, ``famo``, ``gmcoord``
  (GM-Coord, alpha 0.3). An aggregator has nothing to combine in a step of one task.
- four tasks per step (one AdamW, which the aggregators need): ``sum@4`` and the TorchJD
  aggregator ``upgrad@4`` over the four tasks' encoder gradients (``imtlg@4`` and ``pcgrad@4``
  on request: ``--methods``).

Per fit: the final validation metric of every task (AUROC, Dice, mAP50), wall time and CPU
time (user + system: with one thread per fit it is the compute, whatever else runs), peak
resident memory (the process's maximum RSS) and the tug-of-war of its final checkpoint
(``umedpt diagnose``: GD, GM and the index per task on 8 training batches per task). Per
method, over seeds: mean ± sd of every task; ``delta_m`` (Maninis et al.): the mean over tasks
of the relative change of the task's metric against ``sum`` (both the recipe's ``sum`` and its
own group's); the mean rank of the method over tasks (1 = best of all methods).

    python benchmarks/conflict_methods.py                  # 7 methods x 3 seeds (about 100 min on 2 cores)
    python benchmarks/conflict_methods.py --methods sum famo --seeds 0
    python benchmarks/conflict_methods.py --reuse          # keep the fits already in runs/conflict
    python benchmarks/conflict_methods.py --methods gmcoord --merge benchmarks/results/conflict_methods_cpu.json
                                                           # refit one method, the others as recorded

Writes ``benchmarks/results/conflict_methods_cpu.{json,md,png}``.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, markdown_table, recipe_tasks, write_result  # noqa: E402
from benchmarks.transfer import final_validation, stats  # noqa: E402
from umedpt.curves import PRIMARY_METRIC as PRIMARY  # noqa: E402

RUNS = ROOT / "runs" / "conflict"
#: task batches per fit: the recipe's 5000 steps of one task
BUDGET = 5000
FOUR = ["--model.tasks_per_step", "4", "--model.moments", "shared", "--trainer.max_steps", str(BUDGET // 4),
        "--trainer.val_check_interval", str(BUDGET // 20)]  # fmt: skip
#: method -> (group, extra ``umedpt fit`` arguments)
METHODS: dict[str, tuple[str, list[str]]] = {
    "sum": ("one task per step", []),
    "dwa": ("one task per step", ["--model.loss_weighting", "dwa"]),
    "uncertainty": ("one task per step", ["--model.loss_weighting", "uncertainty"]),
    "famo": ("one task per step", ["--model.loss_weighting", "famo"]),
    "gmcoord": ("one task per step", ["--model.coordination", "{alpha: 0.3}"]),
    "sum@4": ("four tasks per step", FOUR),
    "upgrad@4": ("four tasks per step", [*FOUR, "--model.aggregator", "torchjd.aggregation.UPGrad"]),
    "imtlg@4": ("four tasks per step", [*FOUR, "--model.aggregator", "torchjd.aggregation.IMTLG"]),
    "pcgrad@4": ("four tasks per step", [*FOUR, "--model.aggregator", "torchjd.aggregation.PCGrad"]),
}
DEFAULT_METHODS = ["sum", "dwa", "uncertainty", "famo", "gmcoord", "sum@4", "upgrad@4"]
#: the reference of each group
REFERENCE = {"one task per step": "sum", "four tasks per step": "sum@4"}
CONFIGS = ("configs/umedpt.yaml", "configs/quick.yaml")


def slug(method: str) -> str:
    return method.replace("@", "_at")


def run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """Run ``cmd`` with its output in ``log``: its wall seconds, its CPU seconds (user + system,
    which other load on the machine hardly changes) and its peak RSS in MiB."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {proc.returncode}; see {log}")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def fit(method: str, seed: int, reuse: bool) -> dict[str, Any]:
    """One fit of ``method`` with ``seed`` and its diagnosis; the record is kept in its folder."""
    root = RUNS / f"{slug(method)}_seed{seed}"
    record = root / "record.json"
    if reuse and record.is_file():
        return json.loads(record.read_text())
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "umedpt", "fit"]
    for config in CONFIGS:
        cmd += ["-c", config]
    extra = METHODS[method][1]
    cmd += ["--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] fit {method} seed {seed}", flush=True)
    seconds, cpu, peak = run_logged(cmd, root / "fit.log", env)
    version = root / "lightning_logs" / "version_0"
    checkpoint = version / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        checkpoint = sorted((version / "checkpoints").glob("*.ckpt"))[-1]
    diagnose = [sys.executable, "-m", "umedpt", "diagnose", *[a for c in CONFIGS for a in ("-c", c)],
                "--ckpt_path", str(checkpoint), "--output", str(root / "diagnostics")]  # fmt: skip
    run_logged(diagnose, root / "diagnose.log", env)
    reports = sorted((root / "diagnostics").glob("*.json"))
    tug = json.loads(reports[0].read_text()) if reports else {}
    out = {
        "method": method,
        "seed": seed,
        "command": " ".join(cmd[1:]),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mib": peak,
        "validation": final_validation(version),
        "diagnostics": tug,
    }
    record.write_text(json.dumps(out, indent=2) + "\n")
    print(f"[{time.strftime('%H:%M:%S')}] done {method} seed {seed}: {seconds:.0f} s, {peak:.0f} MiB", flush=True)
    return out


def tug_of_war(record: dict[str, Any]) -> dict[str, float]:
    """Task -> tug-of-war index of the fit's final checkpoint: from its diagnose report, or as
    stored in a results file (``--merge``)."""
    if "tug_of_war" in record:
        return record["tug_of_war"]
    checkpoints = (record.get("diagnostics") or {}).get("checkpoints") or []
    last = checkpoints[-1] if checkpoints else {}
    names, values = last.get("tasks") or [], last.get("tug_of_war") or []
    return dict(zip(names, values, strict=False))


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    kinds = {t.name: t.kind for t in recipe_tasks("quick")}
    metric = {name: PRIMARY[kind] for name, kind in kinds.items()}
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    per: dict[str, Any] = {}
    for method in methods:
        runs = [r for r in records if r["method"] == method]
        tasks = {}
        for name in kinds:
            values = [r["validation"][f"val/{name}/{metric[name]}"] for r in runs if f"val/{name}/{metric[name]}" in r["validation"]]
            tugs = [tug_of_war(r).get(name) for r in runs]
            tasks[name] = {
                "metric": metric[name],
                **stats(values),
                "tug_of_war": stats([t for t in tugs if t is not None]) if any(t is not None for t in tugs) else None,
            }
        per[method] = {
            "group": METHODS[method][0],
            "seeds": sorted(r["seed"] for r in runs),
            "tasks": tasks,
            "seconds": stats([r["seconds"] for r in runs]),
            "seconds_per_task_batch": stats([r["seconds"] / BUDGET for r in runs]),
            "cpu_seconds": stats(cpu) if (cpu := [r["cpu_seconds"] for r in runs if r.get("cpu_seconds")]) else {"n": 0},
            "peak_rss_mib": stats([r["peak_rss_mib"] for r in runs]),
            "mean_abs_tug_of_war": stats(
                [statistics.fmean(abs(v) for v in tug_of_war(r).values()) for r in runs if tug_of_war(r)]
            ) if any(tug_of_war(r) for r in runs) else None,
        }  # fmt: skip

    def delta_m(method: str, reference: str) -> float | None:
        if reference not in per:
            return None
        a, b = per[method]["tasks"], per[reference]["tasks"]
        changes = [(a[t]["mean"] - b[t]["mean"]) / b[t]["mean"] for t in kinds if a[t]["n"] and b[t]["n"] and b[t]["mean"]]
        return 100.0 * statistics.fmean(changes)

    for method, entry in per.items():
        entry["delta_m_vs_sum"] = delta_m(method, "sum")
        entry["delta_m_vs_group"] = delta_m(method, REFERENCE[entry["group"]])
    # mean rank over tasks (1 = the best mean metric of all methods)
    ranks: dict[str, list[int]] = {m: [] for m in per}
    for name in kinds:
        order = sorted((m for m in per if per[m]["tasks"][name]["n"]), key=lambda m: -per[m]["tasks"][name]["mean"])
        for rank, m in enumerate(order, start=1):
            ranks[m].append(rank)
    for method, entry in per.items():
        entry["mean_rank"] = statistics.fmean(ranks[method]) if ranks[method] else None
    return {"methods": per, "tasks": list(kinds)}


def tables(summary: dict[str, Any]) -> str:
    per = summary["methods"]
    rows = []
    for method, e in per.items():
        rows.append([
            method, e["group"], len(e["seeds"]),
            f"{e['mean_rank']:.2f}",
            f"{e['delta_m_vs_sum']:+.2f}%" if e["delta_m_vs_sum"] is not None else "-",
            f"{e['delta_m_vs_group']:+.2f}%" if e["delta_m_vs_group"] is not None else "-",
            f"{e['seconds']['mean']:.0f} ± {e['seconds']['sd']:.0f}",
            f"{e['cpu_seconds']['mean']:.0f} ± {e['cpu_seconds']['sd']:.0f} (n={e['cpu_seconds']['n']})" if e["cpu_seconds"]["n"] else "-",
            f"{e['peak_rss_mib']['mean']:.0f}",
            f"{e['mean_abs_tug_of_war']['mean']:.3f}" if e["mean_abs_tug_of_war"] else "-",
        ])  # fmt: skip
    header = ["method", "group", "seeds", "mean rank", "Δm vs sum", "Δm vs its group's sum", "fit wall s", "fit CPU s (1 thread)", "peak RSS MiB", "mean abs tug-of-war"]
    lines = [markdown_table(header, rows), ""]
    task_rows = []
    for name in summary["tasks"]:
        first = next(iter(per.values()))["tasks"][name]
        task_rows.append([f"{name} ({first['metric']})"] + [
            f"{e['tasks'][name]['mean']:.3f} ± {e['tasks'][name]['sd']:.3f}" if e["tasks"][name]["n"] else "-" for e in per.values()
        ])  # fmt: skip
    lines.append(markdown_table(["task", *per], task_rows))
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = summary["methods"]
    tasks = summary["tasks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(per)
    for i, (method, e) in enumerate(per.items()):
        means = [e["tasks"][t]["mean"] if e["tasks"][t]["n"] else float("nan") for t in tasks]
        sds = [e["tasks"][t]["sd"] if e["tasks"][t]["n"] else 0.0 for t in tasks]
        left.bar([j + i * width for j in range(len(tasks))], means, width, yerr=sds, label=method, capsize=1)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=60, ha="right", fontsize=8)
    left.set_ylabel("final validation metric (AUROC / Dice / mAP50), mean ± sd over seeds")
    left.set_title("17-task quick recipe, per task")
    left.legend(fontsize=8, ncol=3)
    names = list(per)
    deltas = [per[m]["delta_m_vs_group"] or 0.0 for m in names]
    right.barh(names, deltas, color=["tab:green" if d >= 0 else "tab:red" for d in deltas])
    right.axvline(0, color="k", lw=0.8)
    right.set_xlabel("Δm vs its group's sum (%)")
    right.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="fits side by side (one thread each)")
    parser.add_argument("--reuse", action="store_true", help="keep the fits already recorded in runs/conflict")
    parser.add_argument("--recorded", action="store_true",
                        help="fit nothing: summarise the fits of --methods and --seeds recorded in runs/conflict")  # fmt: skip
    parser.add_argument("--merge", type=Path, metavar="JSON",
                        help="a results file of this benchmark: its runs stand in for the (method, seed) pairs of --methods and --seeds that runs/conflict does not hold")  # fmt: skip
    parser.add_argument("--name", default="conflict_methods_cpu")
    args = parser.parse_args(argv)
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    if args.recorded:
        paths = [RUNS / f"{slug(m)}_seed{s}" / "record.json" for m, s in jobs]
        records = [r for r in (json.loads(p.read_text()) for p in paths if p.is_file()) if "method" in r]
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            records = list(pool.map(lambda job: fit(job[0], job[1], args.reuse), jobs))
    if args.merge:
        have = {(r["method"], r["seed"]) for r in records}
        try:
            stored = json.loads(args.merge.read_text())["runs"]
        except (OSError, ValueError, KeyError) as error:
            raise SystemExit(f"--merge {args.merge}: expected a results file of this benchmark with a 'runs' list") from error
        records += [r for r in stored if (r["method"], r["seed"]) in set(jobs) - have]
    summary = summarise(records)
    text = tables(summary)
    print(text)
    result = {
        "benchmark": "conflict_methods",
        "budget": f"{BUDGET} task batches per fit ({BUDGET} steps x 1 task, or {BUDGET // 4} steps x 4 tasks)",
        "threads_per_fit": 1,
        "jobs": args.jobs,
        "commands": {m: "umedpt fit -c configs/umedpt.yaml -c configs/quick.yaml " + " ".join(METHODS[m][1]) for m in args.methods},
        **summary,
        "runs": [{k: v for k, v in r.items() if k != "diagnostics"} | {"tug_of_war": tug_of_war(r)}
                 for r in sorted(records, key=lambda r: (list(METHODS).index(r["method"]), r["seed"]))],
    }  # fmt: skip
    write_result(args.name, result)
    (RESULTS / f"{args.name}.md").write_text(text + "\n")
    plot(summary, RESULTS / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
