"""Tug-of-war between tasks at the MLLM connector: the plain MLP connector vs the connector-MoE.

Uni-Med (section 3.1.1) argues that a shared connector makes tasks pull against each other and
that the CMoE connector reduces this. For each connector and seed this fits the MLLM quick recipe
(``lightning fit -c configs/mllm.yaml -c configs/mllm_quick.yaml --model.connector ...``), then
collects each image task's gradient of the connector's parameters on ``--batches`` training
batches (:func:`umedpt.diagnostics.task_gradients`) and reports Uni-Med's indexes
(:func:`umedpt.diagnostics.diagnose`): GD (how a step along task j's gradient directions moves
task i, relative to its own), GM (magnitude similarity) and the tug-of-war index per task. Less
interference: off-diagonal GD nearer 0 or above, a tug-of-war index nearer 1 or above.

    python benchmarks/connector_interference.py                    # 3 seeds, mlp and cmoe
    python benchmarks/connector_interference.py --seeds 0 --batches 4

Writes ``benchmarks/results/connector_interference_cpu.{json,md}`` and a GD / GM heatmap PNG per
connector (seed 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, markdown_table, write_result  # noqa: E402


def fitted(connector: str, seed: int, root: Path) -> Any:
    """The MLLM quick recipe fitted with ``connector`` and ``seed`` (the LightningCLI object)."""
    from umedpt.cli import main

    return main([
        "fit", "-c", "configs/mllm.yaml", "-c", "configs/mllm_quick.yaml", "--model.connector", connector,
        "--seed_everything", str(seed), "--trainer.default_root_dir", str(root / f"{connector}_{seed}"),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ])  # fmt: skip


def measure(cli: Any, count: int, sketch_dim: int | str | None = None) -> dict[str, Any]:
    """The diagnostics of the fitted connector on ``count`` training batches per image task
    (what ``umedpt diagnose`` computes for an MLLM checkpoint), plus summary numbers;
    ``sketch_dim``: keep each gradient as a count sketch of that size, or ``"auto"`` (as
    ``umedpt diagnose``), for connectors whose full gradients do not fit in memory."""
    from umedpt.diagnostic_callbacks import measure as measure_model

    batches = cli.datamodule.task_batches(count)
    result = measure_model(cli.model, {}, count, "connector", sketch_dim=sketch_dim, batches=batches)
    n = len(result["tasks"])
    off = [result["gd"][i][j] for i in range(n) for j in range(n) if i != j]
    result.update(
        gd_offdiagonal_mean=statistics.fmean(off),
        gd_negative_share=sum(v < 0 for v in off) / len(off),
        tug_of_war_mean=statistics.fmean(result["tug_of_war"]),
    )
    return result


def one(connector: str, seed: int, batches: int, out: Path) -> None:
    """Fit and measure one connector and seed; write the result to ``out`` (JSON)."""
    from umedpt.diagnostic_callbacks import plot_interference

    result = measure(fitted(connector, seed, out.parent), batches)
    if seed == 0:
        plot_interference(result, RESULTS / f"connector_interference_{connector}.png", f"{connector} connector, seed {seed}")
    result.pop("statistics_score")  # one value per parameter: the mean is kept
    out.write_text(json.dumps({"connector": connector, "seed": seed, **result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--connectors", nargs="+", default=["mlp", "cmoe"], choices=["mlp", "cmoe"])
    parser.add_argument("--batches", type=int, default=8, help="training batches per task")
    parser.add_argument("--one", nargs=3, metavar=("CONNECTOR", "SEED", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]), args.batches, Path(args.one[2]))
        return

    root = Path(tempfile.mkdtemp(prefix="connector_interference_"))
    runs = []
    for seed in args.seeds:
        for connector in args.connectors:
            # one process per fit: memory is returned between them
            out = root / f"{connector}_{seed}.json"
            subprocess.run([sys.executable, __file__, "--batches", str(args.batches), "--one", connector, str(seed), str(out)],
                           check=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
            result = json.loads(out.read_text())
            runs.append(result)
            print(f"{connector} seed {seed}: tug-of-war mean {result['tug_of_war_mean']:.3f}, off-diagonal GD "
                  f"{result['gd_offdiagonal_mean']:.3f} ({result['gd_negative_share']:.0%} negative)", flush=True)  # fmt: skip
    rows, summary = [], {}
    for connector in args.connectors:
        chosen = [r for r in runs if r["connector"] == connector]
        cells = {}
        for key in ("tug_of_war_mean", "gd_offdiagonal_mean", "gd_negative_share"):
            values = [r[key] for r in chosen]
            cells[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        summary[connector] = {k: list(v) for k, v in cells.items()}
        tasks = chosen[0]["tasks"]
        per_task = {t: statistics.fmean(r["tug_of_war"][r["tasks"].index(t)] for r in chosen) for t in tasks}
        summary[connector]["tug_of_war_per_task"] = per_task
        rows.append([connector, chosen[0]["num_parameters"], *(f"{m:.3f} ± {sd:.3f}" for m, sd in cells.values()),
                     ", ".join(f"{t} {v:.2f}" for t, v in per_task.items())])  # fmt: skip
    header = ["connector", "parameters", "tug-of-war (mean over tasks)", "off-diagonal GD", "share of GD < 0",
              "tug-of-war per task"]  # fmt: skip
    table = markdown_table(header, rows)
    print("\n" + table)
    (RESULTS / "connector_interference_cpu.md").write_text(
        f"Connector gradients of each image task on {args.batches} training batches after the MLLM quick "
        f"recipe, mean ± sd over seeds {args.seeds}.\n\n{table}\n"
    )
    write_result("connector_interference_cpu", {
        "benchmark": "connector_interference", "settings": vars(args), "summary": summary, "runs": runs,
    })  # fmt: skip


if __name__ == "__main__":
    main()
