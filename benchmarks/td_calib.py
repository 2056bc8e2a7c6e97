"""TD-Calib against none, on downstream images shifted from pretraining.

The encoders are the quick recipe's pretrained encoders of ``benchmarks/transfer.py``
(``runs/transfer/pretrain_seed<S>``; run it first). The downstream tasks are the held-out probe
tasks of ``configs/probe_quick.yaml`` with their images shifted from the pretraining
distribution: by default shown as grey images (``channels: 1``, the luminance), so the stain
colours the encoder learned are gone. For each pretraining seed this runs::

    lightning probe -c configs/probe.yaml -c configs/probe_quick.yaml --encoders '{pretrained: <S>, random: random}' \\
        --dataset_defaults '{..., channels: 1}' --calibrate '{steps: N, encoders: [pretrained]}'

so every probe compares the pretrained encoder, its calibrated copy (``pretrained+calib``:
``mim`` + ``feature_mim`` on the task's own training images, no labels) and a random encoder,
at 1% and 100% of the probe data, 3 probe seeds. Writes ``benchmarks/results/td_calib_quick_cpu.{json,md,png}``.

    python benchmarks/td_calib.py                  # 3 pretraining seeds, 300 calibration steps
    python benchmarks/td_calib.py --steps 100 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, markdown_table, probe_bars, write_result  # noqa: E402
from benchmarks.transfer import run  # noqa: E402

RUNS = ROOT / "runs" / "td_calib"
FRACTIONS = [0.01, 1.0]
ENCODERS = ("pretrained", "pretrained+calib", "random")


def probe(seed: int, encoder: Path, steps: int, shift: dict[str, Any], reuse: bool) -> dict[str, Any]:
    out = RUNS / f"probe_seed{seed}"
    reports = sorted(out.glob("version_*/report.json"))
    if reuse and reports:
        return json.loads(reports[-1].read_text())
    import yaml

    defaults = yaml.safe_load((ROOT / "configs/probe_quick.yaml").read_text())["dataset_defaults"]
    cmd = [
        sys.executable, "-m", "umedpt", "probe", "-c", "configs/probe.yaml", "-c", "configs/probe_quick.yaml",
        "--encoders", json.dumps({"pretrained": str(encoder), "random": "random"}),
        "--fractions", json.dumps(FRACTIONS), "--scratch", "null",
        "--dataset_defaults", json.dumps({**defaults, **shift}),
        "--calibrate", json.dumps({"steps": steps, "encoders": ["pretrained"], "seed": seed}),
        "--output_dir", str(out), "--cache_dir", str(RUNS / "cache"), "--progress", "false",
    ]
    out.mkdir(parents=True, exist_ok=True)
    run(cmd, out / "probe.log")
    return json.loads(sorted(out.glob("version_*/report.json"))[-1].read_text())


def pooled(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and encoder, mean ± sd of the probe metric over every report's probe seeds."""
    tasks: dict[str, Any] = {}
    for name in reports[0]["tasks"]:
        first = reports[0]["tasks"][name]
        values: dict[str, dict[float, list[float]]] = {e: {} for e in ENCODERS}
        calibration = []
        for report in reports:
            task = report["tasks"][name]
            for encoder in ENCODERS:
                for entry in task["runs"][encoder]:
                    values[encoder].setdefault(entry["fraction"], []).append(entry["metrics"][task["metric"]])
            calibration.append(task["calibration"]["pretrained"])
        tasks[name] = {
            "metric": first["metric"],
            "n_per_fraction": first["n_per_fraction"],
            "fractions": {
                e: {repr(f): {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
                    for f, v in sorted(per.items())}
                for e, per in values.items()
            },
            "calibration": calibration,
        }
    return tasks


def table(result: dict[str, Any]) -> str:
    cell = lambda s: f"{s['mean']:.3f} ± {s['sd']:.3f}"  # noqa: E731
    rows, gains = [], {f: [] for f in FRACTIONS}
    for name, task in result["tasks"].items():
        for f in FRACTIONS:
            pre, cal, rnd = (task["fractions"][e][repr(f)] for e in ENCODERS)
            gains[f].append(cal["mean"] - pre["mean"])
            rows.append([name, f"{f:.0%} ({task['n_per_fraction'][repr(f)]} images)", cell(pre), f"**{cell(cal)}**",
                         f"{cal['mean'] - pre['mean']:+.3f}", cell(rnd)])
    header = ["task (test accuracy, shifted images)", "probe data", "pretrained", "pretrained + TD-Calib",
              "calibration gain", "random"]
    return "\n".join([
        markdown_table(header, rows),
        "",
        f"Shift: {result['shift']}; calibration: {result['steps']} steps of mim + feature_mim on each task's "
        f"training images. Mean ± sd over {len(result['pretrain_seeds'])} pretraining seeds x "
        f"{len(result['probe_seeds'])} probe seeds (random: probe seeds). Mean calibration gain "
        + ", ".join(f"at {f:.0%}: **{statistics.fmean(g):+.3f}**" for f, g in gains.items())
        + ". Regenerate with `python benchmarks/td_calib.py`.",
    ])


def plot(result: dict[str, Any], path: Path) -> None:
    tasks = result["tasks"]
    series = [(e, lambda n, f, e=e: tasks[n]["fractions"][e][repr(f)]) for e in ENCODERS]
    probe_bars(list(tasks), FRACTIONS, series, path, "linear probe at {fraction:.0%}, shifted images")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds of runs/transfer")
    parser.add_argument("--steps", type=int, default=300, help="calibration steps")
    parser.add_argument("--shift", default='{"channels": 1}', help="dataset_defaults that shift the probe images (JSON)")
    parser.add_argument("--pretrained", type=Path, default=ROOT / "runs" / "transfer",
                        help="folder of the pretraining runs (pretrain_seed<S>/lightning_logs/version_0/encoder)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished probes in runs/td_calib")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    shift = json.loads(args.shift)
    reports = []
    for seed in args.seeds:
        encoder = args.pretrained / f"pretrain_seed{seed}" / "lightning_logs" / "version_0" / "encoder"
        if not (encoder / "model.safetensors").is_file():
            raise SystemExit(f"no pretrained encoder at {encoder}: run python benchmarks/transfer.py first")
        reports.append(probe(seed, encoder, args.steps, shift, args.reuse))
        print(f"probe of pretraining seed {seed} done", flush=True)
    result = {
        "benchmark": "td_calib",
        "commands": [f"python benchmarks/td_calib.py --steps {args.steps} --shift '{args.shift}'"],
        "pretrain_seeds": args.seeds,
        "probe_seeds": reports[0]["settings"]["seeds"],
        "steps": args.steps,
        "shift": shift,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "tasks": pooled(reports),
    }
    write_result("td_calib_quick_cpu", result)
    text = table(result)
    (RESULTS / "td_calib_quick_cpu.md").write_text(text + "\n")
    plot(result, RESULTS / "td_calib_quick_cpu.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
