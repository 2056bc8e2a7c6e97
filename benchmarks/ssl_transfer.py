"""Self-supervised pretraining against a random encoder on the held-out probe tasks.

``--recipe ssl`` pretrains on the SSL tasks of ``configs/ssl_quick.yaml`` alone (no labels);
``supervised+mim`` and ``supervised+mim+feature_mim`` add that file's ``mim`` (and
``feature_mim``) tasks to the quick recipe's 17 supervised tasks, at the recipe's step budget.
For each pretraining seed S this runs, each command in its own process::

    lightning fit -c configs/umedpt.yaml -c configs/quick.yaml -c <the recipe's tasks> --seed_everything S ...
    lightning probe -c configs/probe.yaml -c configs/probe_quick.yaml --encoders '{pretrained: <S>, random: random}'

and pools the probes as ``benchmarks/transfer.py`` does (mean ± sd over pretraining seeds x probe
seeds; the random encoder over probe seeds). The supervised quick recipe's numbers from
``benchmarks/results/transfer_quick_cpu.json`` (same probe tasks, fractions and seeds) are put
beside them when that file is there. Writes ``benchmarks/results/ssl_quick_cpu.json``, ``.md``
and ``.png``.

    python benchmarks/ssl_transfer.py                       # SSL only, 3 pretraining seeds
    python benchmarks/ssl_transfer.py --recipe supervised+mim+feature_mim   # SSL tasks added to the quick recipe
    python benchmarks/ssl_transfer.py --seeds 0 --reuse     # one seed, keep finished runs in runs/ssl_bench
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

from benchmarks import transfer  # noqa: E402
from benchmarks.common import RESULTS, ROOT, markdown_table, probe_bars, write_result  # noqa: E402
from benchmarks.transfer import pooled, run, stats  # noqa: E402

RUNS = ROOT / "runs" / "ssl_bench"
BASE = ["configs/umedpt.yaml", "configs/quick.yaml"]
FRACTIONS = [0.01, 1.0]
#: the pretraining recipes: the SSL tasks of configs/ssl_quick.yaml alone, or added to the quick
#: recipe's 17 supervised tasks (same optimizer-step budget, one random task per step)
RECIPES = {
    "ssl": None,
    "supervised+mim": ("mim",),
    "supervised+mim+feature_mim": ("mim", "feature_mim"),
}


def recipe_configs(recipe: str) -> list[str]:
    """The ``-c`` files of a recipe (a mixed recipe's task list is written under runs/)."""
    kinds = RECIPES[recipe]
    if kinds is None:
        return [*BASE, "configs/ssl_quick.yaml"]
    import yaml

    supervised = yaml.safe_load((ROOT / "configs/umedpt.yaml").read_text())["model"]["tasks"]
    ssl = [t for t in yaml.safe_load((ROOT / "configs/ssl_quick.yaml").read_text())["model"]["tasks"] if t["kind"] in kinds]
    path = RUNS / recipe / "tasks.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"model": {"tasks": supervised + ssl}}, sort_keys=False))
    return [*BASE, str(path.relative_to(ROOT))]


def pretrain(recipe: str, seed: int, reuse: bool, extra: list[str]) -> tuple[Path, float | None]:
    return transfer.pretrain(
        seed, reuse, RUNS / recipe / f"pretrain_seed{seed}", tuple(recipe_configs(recipe)), tuple(extra)
    )


def probe(recipe: str, seed: int, encoder: Path, reuse: bool) -> dict[str, Any]:
    out = RUNS / recipe / f"probe_seed{seed}"
    reports = sorted(out.glob("version_*/report.json"))
    if reuse and reports:
        return json.loads(reports[-1].read_text())
    cmd = [
        sys.executable, "-m", "umedpt", "probe", "-c", "configs/probe.yaml", "-c", "configs/probe_quick.yaml",
        "--encoders", json.dumps({"pretrained": str(encoder), "random": "random"}),
        "--fractions", json.dumps(FRACTIONS), "--scratch", "null",
        "--output_dir", str(out), "--cache_dir", str(RUNS / "cache"), "--progress", "false",
    ]
    out.mkdir(parents=True, exist_ok=True)
    run(cmd, out / "probe.log")
    return json.loads(sorted(out.glob("version_*/report.json"))[-1].read_text())


def supervised_reference() -> dict[str, Any] | None:
    """The supervised quick recipe's pooled probes (``transfer.py``), if they were measured."""
    path = RESULTS / "transfer_quick_cpu.json"
    return json.loads(path.read_text())["tasks"] if path.is_file() else None


def table(result: dict[str, Any]) -> str:
    cell = lambda s: f"{s['mean']:.3f} ± {s['sd']:.3f}"  # noqa: E731
    reference = result.get("supervised") or {}
    rows, gaps = [], {f: [] for f in FRACTIONS}
    for name, task in result["tasks"].items():
        for f in FRACTIONS:
            pre, rnd = task["fractions"]["pretrained"][repr(f)], task["fractions"]["random"][repr(f)]
            gaps[f].append(pre["mean"] - rnd["mean"])
            sup = (reference.get(name) or {}).get("fractions", {}).get("pretrained", {}).get(repr(f))
            rows.append([
                name, f"{f:.0%} ({task['n_per_fraction'][repr(f)]} images)", f"**{cell(pre)}**", cell(rnd),
                f"{pre['mean'] - rnd['mean']:+.3f}", cell(sup) if sup else "-",
            ])
    header = ["task (test accuracy)", "probe data", f"pretrained ({result['recipe']})", "random", "gap",
              "supervised pretraining"]
    fit = result["fit_seconds"]
    return "\n".join([
        markdown_table(header, rows),
        "",
        f"Mean ± sd over {len(result['pretrain_seeds'])} pretraining seeds x {len(result['probe_seeds'])} "
        f"probe seeds (random: probe seeds; supervised: the quick recipe, `benchmarks/transfer.py`). Mean gap "
        + ", ".join(f"at {f:.0%}: **{statistics.fmean(g):+.3f}**" for f, g in gaps.items())
        + ". "
        + (f"Pretraining took {stats(fit)['mean']:.0f} ± {stats(fit)['sd']:.0f} s per seed "
           f"(OMP_NUM_THREADS={result.get('omp_threads') or 'unset'}). " if fit else "")
        + "Regenerate with `python benchmarks/ssl_transfer.py`.",
    ])


def plot(result: dict[str, Any], path: Path) -> None:
    reference = result.get("supervised") or {}
    tasks = result["tasks"]
    series = [
        ("random init", lambda n, f: tasks[n]["fractions"]["random"][repr(f)]),
        (result["recipe"], lambda n, f: tasks[n]["fractions"]["pretrained"][repr(f)]),
        ("supervised pretraining", lambda n, f: (reference.get(n) or {}).get("fractions", {}).get("pretrained", {}).get(repr(f))),
    ]
    probe_bars(list(tasks), FRACTIONS, series, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="ssl",
                        help="SSL tasks alone, or added to the quick recipe's supervised tasks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds")
    parser.add_argument("--reuse", action="store_true", help="reuse finished fits and probes in runs/ssl_bench")
    parser.add_argument("--name", default=None, help="result file name under benchmarks/results "
                        "(default ssl_quick_cpu, or ssl_<recipe>_quick_cpu for a mixed recipe)")
    parser.add_argument("fit_args", nargs="*", help="extra arguments of the fits (after --), e.g. --trainer.max_steps=2000")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    name = args.name or ("ssl_quick_cpu" if args.recipe == "ssl" else f"ssl_{args.recipe.replace('+', '_')}_quick_cpu")
    reports, fit_seconds = [], []
    for seed in args.seeds:
        encoder, seconds = pretrain(args.recipe, seed, args.reuse, args.fit_args)
        if seconds is not None:
            fit_seconds.append(seconds)
            print(f"{args.recipe} pretraining seed {seed}: {seconds:.0f} s -> {encoder}", flush=True)
        reports.append(probe(args.recipe, seed, encoder, args.reuse))
        print(f"probe of pretraining seed {seed} done", flush=True)
    result = {
        "benchmark": "ssl",
        "recipe": args.recipe,
        "commands": [
            f"python benchmarks/ssl_transfer.py --recipe {args.recipe}",
            "lightning fit " + " ".join(f"-c {c}" for c in recipe_configs(args.recipe))
            + " --seed_everything S --model.seed S --data.seed S " + " ".join(args.fit_args),
            "lightning probe -c configs/probe.yaml -c configs/probe_quick.yaml --fractions '[0.01, 1.0]' --scratch null",
        ],
        "pretrain_seeds": args.seeds,
        "probe_seeds": reports[0]["settings"]["seeds"],
        "fit_seconds": fit_seconds,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "tasks": pooled(reports),
        "supervised": supervised_reference(),
    }
    write_result(name, result)
    text = table(result)
    (RESULTS / f"{name}.md").write_text(text + "\n")
    plot(result, RESULTS / f"{name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
