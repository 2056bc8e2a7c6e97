"""LayerNorm-type norms vs BatchNorm in the shared encoder, trained with the task-by-task loop.

umedpt refuses BatchNorm in the shared encoder: each step feeds it one task's batch, from a
different dataset each time, so batch statistics change from task to task and the running
statistics used at evaluation describe a mixture of the tasks. This benchmark measures what
happens otherwise, on two architectures so the answer does not hang on one:

* ``swin_ln``: the quick recipe's Swin (LayerNorm, the library's encoder);
* ``swin_bn``: the same Swin with BatchNorm over the token channels in every norm
  (``SwinEncoder(norm="batchnorm", allow_batchnorm=True)``, the ablation's escape hatch);
* ``cnn_gn`` / ``cnn_bn``: a small CNN (strides 4-32, channels 32-256 like the quick Swin) with
  GroupNorm or BatchNorm after every convolution.

Each variant trains one task per world of the quick recipe's synthetic data (5 tasks, one random
task per step, the quick recipe's optimiser) for the same number of steps, then is validated
twice: in evaluation mode (BatchNorm uses its running statistics, as in every real use) and with
BatchNorm on the statistics of each validation batch (one task's images, as during training; all
other modules in evaluation mode, so for LayerNorm / GroupNorm the two are identical). A linear
probe (logistic regression) on the frozen encoder's pooled features of a task no variant trained
(``histology_dominant``) measures what transfers.

    python benchmarks/norm_ablation.py                      # 4 variants x 3 seeds, 2 fits at a time
    python benchmarks/norm_ablation.py --variants swin_ln swin_bn --seeds 0 --steps 300

Writes ``benchmarks/results/norm_ablation_cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.common import RESULTS, markdown_table, quiet_trainer, write_result  # noqa: E402
from benchmarks.learning import datamodule, encoder_args, evaluate, recipe_config, task_specs  # noqa: E402

VARIANTS = ("swin_ln", "swin_bn", "cnn_gn", "cnn_bn")
#: one task per world of the quick recipe (image-level: the cheapest steps)
TASKS = ("radiograph_grade", "ct_grade", "fluorescence_objects", "histology_grade", "dermoscopy_grade")
PROBE_TASK = ("histology", "dominant")


class SmallCNN(nn.Module):
    """A four-stage CNN feature pyramid (strides 4, 8, 16, 32) with one norm type throughout:
    the second architecture of the ablation. It has the attributes the heads and the module read
    from an encoder (``out_channels``, ``reductions``, ``embed_dim``, ``config``)."""

    def __init__(self, norm: str, channels: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batchnorm" else nn.GroupNorm(8, c)

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), norm_layer(c_out), nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), norm_layer(c_out), nn.ReLU(inplace=True),
            )  # fmt: skip

        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 4, 4, bias=False), norm_layer(channels[0]), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(
            [block(channels[0], channels[0], 1)] + [block(a, b, 2) for a, b in zip(channels[:-1], channels[1:], strict=True)]
        )
        self.out_channels = list(channels)
        self.reductions = [4, 8, 16, 32]
        self.embed_dim = channels[-1]
        self.in_chans = 3
        self.config = {"name": f"small_cnn_{norm}", "channels": list(channels)}
        self.allow_batchnorm = norm == "batchnorm"  # the ablation's escape hatch

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def embed(self, x: Tensor) -> Tensor:
        return self(x)[-1].mean(dim=(-2, -1))


def build_encoder(variant: str, cfg: dict[str, Any]) -> nn.Module:
    from umedpt import SwinEncoder

    if variant.startswith("swin"):
        norm = "batchnorm" if variant == "swin_bn" else "layernorm"
        return SwinEncoder(**encoder_args(cfg), norm=norm, allow_batchnorm=norm == "batchnorm")
    return SmallCNN("batchnorm" if variant == "cnn_bn" else "groupnorm")


def batch_statistics(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in evaluation mode except its BatchNorm layers, which normalise with the
    statistics of the batch they see (momentum 0: their running statistics stay as trained)."""
    copied = copy.deepcopy(model).eval()
    for module in copied.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.momentum = 0.0
    return copied


@torch.no_grad()
def probe(encoder: nn.Module, seed: int, train: int = 1024, test: int = 512) -> float:
    """Test accuracy of a logistic regression on the frozen encoder's pooled features (evaluation
    mode) of a task no variant trained on."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from umedpt.data.synthetic import SyntheticTaskDataset

    style, family = PROBE_TASK

    def features(split: str, n: int) -> tuple[Any, Any]:
        data = SyntheticTaskDataset(style, family, split=split, num_samples=n, image_size=64, seed=seed)
        images = torch.stack([data[i]["image"] for i in range(n)])
        labels = torch.stack([torch.as_tensor(data[i]["label"]) for i in range(n)])
        pooled = torch.cat([encoder.embed(images[i : i + 64]) for i in range(0, n, 64)])
        return pooled.numpy(), labels.numpy()

    encoder.eval()
    x_train, y_train = features("train", train)
    x_test, y_test = features("test", test)
    scaler = StandardScaler().fit(x_train)
    classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(x_train), y_train)
    return float(classifier.score(scaler.transform(x_test), y_test))


def one(variant: str, seed: int, steps: int) -> dict[str, Any]:
    """Fit ``variant`` on :data:`TASKS` for ``steps`` optimizer steps; its metrics both ways and the probe."""
    from lightning import seed_everything

    from umedpt import MultiTaskModule
    from umedpt.curves import PRIMARY_METRIC

    cfg = recipe_config("quick", [])
    tasks = task_specs(cfg, list(TASKS))
    seed_everything(seed, verbose=False)
    model_cfg = {k: v for k, v in cfg["model"].items() if k not in ("tasks", "encoder")}
    model_cfg.update(export_encoder=False, tasks_per_step=1, seed=seed)
    model = MultiTaskModule(tasks=tasks, encoder=build_encoder(variant, cfg), **model_cfg)
    dm = datamodule(cfg, tasks, seed, tasks_per_step=1)
    quiet_trainer(steps).fit(model, datamodule=dm)
    model.eval()
    batch_model = batch_statistics(model)
    rows = {}
    for task, loader in zip(tasks, dm.val_dataloader(), strict=True):
        metric = PRIMARY_METRIC[task.kind]
        running = evaluate(lambda image, n=task.name: model.forward_task(n, image), model.heads[task.name], loader)
        batch = evaluate(lambda image, n=task.name: batch_model.forward_task(n, image), batch_model.heads[task.name], loader)
        rows[task.name] = {"metric": metric, "running": running[metric], "batch": batch[metric]}
    return {"variant": variant, "seed": seed, "steps": steps, "tasks": rows, "probe": probe(model.encoder, seed)}


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} ± {s['sd']:.3f}"


def summarise(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        per_task = {
            t: {mode: mean_sd([r["tasks"][t][mode] for r in mine]) for mode in ("running", "batch")} for t in TASKS
        }
        # the mean over tasks per seed, then mean ± sd over seeds
        running = [statistics.fmean(r["tasks"][t]["running"] for t in TASKS) for r in mine]
        batch = [statistics.fmean(r["tasks"][t]["batch"] for t in TASKS) for r in mine]
        out[v] = {
            "tasks": per_task,
            "mean_running": mean_sd(running),
            "mean_batch": mean_sd(batch),
            "gap": mean_sd([a - b for a, b in zip(running, batch, strict=True)]),
            "probe": mean_sd([r["probe"] for r in mine]),
            "seeds": [r["seed"] for r in mine],
        }
    return out


def table(summary: dict[str, Any]) -> str:
    variants = list(summary)
    header = ["task (AUROC)", *[f"{v} running / batch stats" for v in variants]]
    rows = [[t, *[f"{fmt(summary[v]['tasks'][t]['running'])} / {fmt(summary[v]['tasks'][t]['batch'])}" for v in variants]]
            for t in TASKS]  # fmt: skip
    rows.append(["mean over tasks", *[f"**{fmt(summary[v]['mean_running'])}** / {fmt(summary[v]['mean_batch'])}" for v in variants]])
    rows.append(["running - batch", *[fmt(summary[v]["gap"]) for v in variants]])
    rows.append([f"probe {'_'.join(PROBE_TASK)} (accuracy)", *[fmt(summary[v]["probe"]) for v in variants]])
    return markdown_table(header, rows)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = range(len(variants))
    for offset, mode, label in ((-0.2, "mean_running", "evaluation mode (running statistics)"),
                                (0.2, "mean_batch", "statistics of each task's batch")):  # fmt: skip
        axes[0].bar([i + offset for i in x], [summary[v][mode]["mean"] for v in variants], 0.4,
                    yerr=[summary[v][mode]["sd"] for v in variants], label=label, capsize=3)  # fmt: skip
    axes[0].set(xticks=list(x), xticklabels=variants, ylabel="mean validation AUROC over 5 tasks", ylim=(0.4, 1.0))
    axes[0].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[0].legend(fontsize=8)
    axes[1].bar(list(x), [summary[v]["probe"]["mean"] for v in variants], yerr=[summary[v]["probe"]["sd"] for v in variants], capsize=3)
    axes[1].set(xticks=list(x), xticklabels=variants, ylabel=f"probe accuracy, {'_'.join(PROBE_TASK)}")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Normalisation in the shared encoder, task-by-task loop (mean ± sd over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (one task each)")
    parser.add_argument("--jobs", type=int, default=2, help="fits at a time (each with one torch thread)")
    parser.add_argument("--name", default="norm_ablation_cpu")
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "SEED", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        torch.set_num_threads(1)
        variant, seed, out = args.one
        Path(out).write_text(json.dumps(one(variant, int(seed), args.steps)))
        return
    root = Path(tempfile.mkdtemp(prefix="norm_ablation_"))
    jobs = [(v, s, root / f"{v}_{s}.json") for s in args.seeds for v in args.variants]
    running: list[tuple[subprocess.Popen, Path]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i, (variant, seed, out) in enumerate(jobs):
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--one", variant, str(seed), str(out)]
        running.append((subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL), out))
        if len(running) >= args.jobs or i == len(jobs) - 1:
            for proc, path in running:
                if proc.wait():
                    raise SystemExit(f"fit {path.stem} failed (exit {proc.returncode})")
                print(f"{path.stem} done", flush=True)
            running = []
    runs = [json.loads(out.read_text()) for _, _, out in jobs]
    summary = summarise(runs, args.variants)
    text = table(summary)
    print("\n" + text)
    command = "python benchmarks/norm_ablation.py " + " ".join(sys.argv[1:])
    write_result(args.name, {"benchmark": "norm_ablation", "command": command.strip(), "steps": args.steps,
                             "tasks": list(TASKS), "probe_task": "_".join(PROBE_TASK), "runs": runs, "summary": summary})  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text(
        f"Normalisation ablation, {args.steps} steps (one task each) on {', '.join(TASKS)}; seeds {args.seeds}; "
        f"AUROC (fluorescence_objects: multi-label AUROC) with BatchNorm's running statistics / with each "
        f"validation batch's own statistics. Command: `{command.strip()}`\n\n{text}\n"
    )
    plot(summary, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
