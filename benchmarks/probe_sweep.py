"""Time a full probe sweep: 6 fractions x 3 seeds x 2 encoders (pretrained, random) on one task.

The task has a 10 000-image training split (plus validation and test splits) of synthetic
64 px images. The sweep runs twice with an empty feature cache folder: the first run extracts the
features (one pass per split for both encoders), the second finds them all in the cache.
Prints the times and writes ``benchmarks/results/probe_sweep_<name>.json``.

    python benchmarks/probe_sweep.py --encoder 'runs/quick/lightning_logs/version_*/encoder'
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from umedpt.probe import FRACTIONS, ProbeSettings, TrainBudget, run_probe  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def settings(encoder: str, sizes: dict[str, int], work: Path, scratch: bool) -> ProbeSettings:
    """The benchmark sweep: histology count bins, 64 px, both encoders, every default fraction."""
    data = {
        "class_path": "umedpt.data.synthetic.SyntheticTaskDataset",
        "init_args": {"style": "histology", "family": "count_bin", "image_size": 64, "num_samples": sizes},
    }
    task = {"name": "histology_count", "kind": "classification", "num_classes": 4, "data": data}
    return ProbeSettings(
        encoders={"pretrained": encoder, "random": "random"},
        tasks=[task],
        fractions=list(FRACTIONS),
        seeds=[0, 1, 2],
        scratch=TrainBudget() if scratch else None,
        output_dir=str(work / "out"),
        cache_dir=str(work / "cache"),
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", default="runs/quick/lightning_logs/version_*/encoder")
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--val", type=int, default=1_000)
    parser.add_argument("--test", type=int, default=2_000)
    parser.add_argument("--scratch", action="store_true", help="also train the scratch@100%% baseline")
    parser.add_argument("--name", default="quick_cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"train": args.train, "val": args.val, "test": args.test}
        s = settings(args.encoder, sizes, Path(tmp), args.scratch)
        timings = []
        for label in ("cold cache", "warm cache"):
            start = time.perf_counter()
            report, _ = run_probe(s)
            seconds = time.perf_counter() - start
            task = report["tasks"]["histology_count"]
            timings.append(
                {"run": label, "seconds": seconds, "cache": report["feature_cache"], **task["timing"]}
            )
            print(f"{label}: {seconds:.1f} s  {task['timing']}  cache {report['feature_cache']}")
    summary = {name: {f: round(v["mean"], 4) for f, v in s_.items()} for name, s_ in task["summary"].items()}
    result = {
        "date": datetime.date.today().isoformat(),
        "task": "histology count_bin, 64 px",
        "splits": sizes,
        "fractions": list(FRACTIONS),
        "seeds": [0, 1, 2],
        "encoders": report["encoders"],
        "timings": timings,
        "accuracy": summary,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"probe_sweep_{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
