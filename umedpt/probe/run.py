"""One probe run: every encoder x task x fraction x seed, the scratch baseline, and the report."""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

import umedpt
from umedpt.data.datamodule import SPLITS, MultiTaskDataModule
from umedpt.data.datamodule import resolved_data as data_with_defaults
from umedpt.encoder import SwinEncoder
from umedpt.probe.calibrate import Calibration, calibrate
from umedpt.probe.encoders import ProbeError, load_encoders, random_encoder, weights_hash
from umedpt.probe.features import FeatureCache, cached_features, check_channels
from umedpt.probe.linear import C_GRID, evaluate, fit_linear_probe
from umedpt.probe.report import mean_std, summarise, write_report
from umedpt.probe.subsets import check_fraction, check_labels, stratified_subset
from umedpt.probe.train import TrainBudget, train_and_test
from umedpt.tasks import Task, as_task, check_unique

#: default training fractions
FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class ProbeSettings:
    """Settings of a probe run; each field is a key of ``configs/probe.yaml``.

    Args:
        encoders: name -> source: an exported encoder folder, its ``model.safetensors``, a
            training checkpoint, a glob of those (the newest match is used), ``random`` (random
            init with the config of the first other encoder) or ``random:<source>``.
        tasks: downstream tasks, as in pretraining (name, kind, num_classes, data), of any
            kind: ``classification`` and ``multilabel`` get linear probes, every other kind
            (segmentation, detection, a plug-in kind) a head probe (frozen encoder, the task's
            head trained).
        fractions: shares of the training split, each in (0, 1]; stratified, >= 1 sample per class.
        seeds: one subset (and training run) per seed; the report gives mean and std over them.
        mode: ``linear`` (frozen encoder) or ``finetune`` (encoder and head trained end to end).
        dataset_defaults: keyword arguments given to each task dataset that accepts them.
        head_defaults: per task kind, head arguments of the trained heads (decoder size...).
        c_grid: inverse L2 strengths tried by the linear probes; the best on validation is kept.
        segmentation: budget of each head probe (only the head learns; segmentation and every
            kind without a linear probe).
        finetune: budget of each fine-tuning run (``mode: finetune``).
        scratch: budget of the scratch baseline (same architecture, random init, 100% of the
            training split, trained end to end); ``null`` skips it.
        scratch_runs: number of scratch runs (seeds) per task.
        calibrate: TD-Calib (:class:`~umedpt.probe.calibrate.Calibration`): before probing a
            task, continue self-supervised training of each encoder on that task's training
            images (no labels) and probe the calibrated copy too, as ``<encoder>+calib``;
            ``null`` (default) probes the encoders as given.
        output_dir: each run writes ``<output_dir>/version_N/report.{json,md,png}``.
        cache_dir: feature cache folder; ``null`` disables the cache.
        batch_size: images per batch while extracting features.
        num_workers: DataLoader worker processes.
        device: ``cpu``, ``cuda``, ``auto``...
        random_seed: seed of the random-init encoders.
        progress: show progress bars.
    """

    encoders: dict[str, str]
    tasks: list[Task]
    fractions: list[float] = field(default_factory=lambda: list(FRACTIONS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    mode: Literal["linear", "finetune"] = "linear"
    dataset_defaults: dict[str, Any] = field(default_factory=dict)
    head_defaults: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"segmentation": {"decoder_channels": 32}}
    )
    c_grid: list[float] = field(default_factory=lambda: list(C_GRID))
    segmentation: TrainBudget = field(default_factory=lambda: TrainBudget(steps=200))
    finetune: TrainBudget = field(default_factory=TrainBudget)
    scratch: TrainBudget | None = field(default_factory=TrainBudget)
    scratch_runs: int = 1
    calibrate: Calibration | None = None
    output_dir: str = "runs/probe"
    cache_dir: str | None = "runs/probe/cache"
    batch_size: int = 256
    num_workers: int = 0
    device: str = "cpu"
    random_seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.tasks = [as_task(t) for t in self.tasks]
        check_unique(self.tasks)
        self.fractions = sorted({check_fraction(f) for f in self.fractions})
        if not self.seeds:
            raise ProbeError("seeds: give at least one seed")
        if self.mode not in ("linear", "finetune"):
            raise ProbeError(f"mode must be 'linear' or 'finetune', got {self.mode!r}")
        for task in self.tasks:
            if task.task_kind.linear_probe and task.num_classes < 2:
                raise ProbeError(f"task {task.name!r} has 1 class; a probe needs at least 2 classes")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(self.calibrate, Mapping):
            self.calibrate = Calibration(**self.calibrate)
        if self.calibrate is not None:
            unknown = sorted(set(self.calibrate.encoders or []) - set(self.encoders))
            if unknown:
                raise ProbeError(f"calibrate.encoders: {unknown} are not among the encoders {sorted(self.encoders)}")


def resolved_data(task: Task, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``task.data`` with the ``defaults`` its dataset class accepts (the task's own values win);
    :func:`umedpt.data.datamodule.resolved_data`, its errors as :class:`ProbeError`."""
    try:
        return data_with_defaults(task, defaults)
    except (ValueError, ImportError, TypeError) as err:
        raise ProbeError(str(err)) from err


def build_splits(
    task: Task, defaults: Mapping[str, Any]
) -> tuple[dict[str, Dataset], dict[str, dict[str, Any]]]:
    """The train/val/test datasets of ``task`` and their specs (the feature cache keys)."""
    data = resolved_data(task, defaults)
    resolved = dataclasses.replace(task, data=data, batch_size=1)
    module = MultiTaskDataModule(tasks=[resolved], num_workers=0)
    datasets, specs = {}, {}
    for split in SPLITS:
        try:
            datasets[split] = dataset = module.build_dataset(resolved, split)
        except (TypeError, ValueError, FileNotFoundError, IndexError) as err:
            raise ProbeError(str(err)) from err
        transform = re.sub(r" at 0x[0-9a-f]+", "", repr(getattr(dataset, "transform", None)))
        specs[split] = {**data, "split": split, "length": len(dataset), "transform": transform}
    return datasets, specs


def _method(task: Task, settings: ProbeSettings) -> tuple[str, str]:
    """Short name and description of how ``task`` is evaluated."""
    if settings.mode == "finetune":
        return "fine-tuning", f"encoder and head trained end to end, {settings.finetune.steps} steps"
    if not task.task_kind.linear_probe:
        budget = settings.segmentation
        return (
            f"{task.task_kind.name} probe",
            f"frozen encoder, the task's head trained {budget.steps} steps of {budget.batch_size}",
        )
    return "linear probe", "L2 logistic regression on frozen embeddings, C chosen on the val split"


class _TaskProbe:
    """Probes of one task with every encoder at every fraction and seed."""

    def __init__(
        self,
        task: Task,
        encoders: dict[str, SwinEncoder],
        hashes: dict[str, str],
        cache: FeatureCache,
        settings: ProbeSettings,
    ) -> None:
        self.task, self.encoders, self.hashes, self.cache, self.s = task, encoders, hashes, cache, settings
        start = time.perf_counter()
        self.say(f"task {task.name} ({task.kind}): building its splits")
        self.datasets, self.specs = build_splits(task, settings.dataset_defaults)
        sizes = ", ".join(f"{split} {len(self.datasets[split])}" for split in SPLITS)
        self.say(f"task {task.name}: {sizes} images ({time.perf_counter() - start:.1f} s)")
        check_channels(encoders, task.name, int(self.datasets["train"][0]["image"].shape[0]))
        self.calibration: dict[str, Any] = {}
        if settings.calibrate is not None:
            self.encoders, self.hashes = self._calibrated(settings.calibrate)
        self.linear = settings.mode == "linear" and task.task_kind.linear_probe
        self.features: dict[str, dict[str, Any]] = {}
        self.fitted: dict[tuple[str, bytes], dict[str, Any]] = {}  # linear probes are deterministic
        self.labels: np.ndarray | None = None
        self.timing = {"features_s": 0.0, "probes_s": 0.0, "scratch_s": 0.0}

    def _calibrated(self, calibration: Calibration) -> tuple[dict[str, SwinEncoder], dict[str, str]]:
        """The encoders with a TD-Calib copy of each chosen one after it (``<name>+calib``)."""
        encoders, hashes = {}, {}
        for name, encoder in self.encoders.items():
            encoders[name], hashes[name] = encoder, self.hashes[name]
            if calibration.encoders is not None and name not in calibration.encoders:
                continue
            start = time.perf_counter()
            self.say(f"task {self.task.name}: calibrating {name} ({calibration.steps} steps of {', '.join(calibration.kinds)})")
            calibrated, record = calibrate(encoder, self.datasets["train"], calibration, self.s.device)
            record["seconds"] = round(time.perf_counter() - start, 1)
            encoders[f"{name}+calib"], hashes[f"{name}+calib"] = calibrated, weights_hash(calibrated)
            self.calibration[name] = record
        return encoders, hashes

    def say(self, message: str) -> None:
        """One line of progress on stderr (with ``progress``), so that no phase is silent."""
        if self.s.progress:
            print(f"umedpt probe: {message}", file=sys.stderr, flush=True)

    def _extract(self) -> None:
        start = time.perf_counter()
        kwargs = {"batch_size": self.s.batch_size, "num_workers": self.s.num_workers, "device": self.s.device}
        for split in SPLITS:
            self.features[split] = cached_features(
                self.encoders,
                self.hashes,
                self.datasets[split],
                self.specs[split],
                self.task.name,
                self.cache,
                progress=self.s.progress,
                **kwargs,
            )
        self.labels = next(iter(self.features["train"].values())).y
        check_labels(self.labels, self.task.num_classes, self.task.name, self.task.class_names)
        self.timing["features_s"] += time.perf_counter() - start

    def _train(
        self,
        encoder: SwinEncoder,
        indices: np.ndarray,
        budget: TrainBudget,
        freeze: bool,
        seed: int,
        desc: str,
    ) -> dict[str, float]:
        return train_and_test(
            encoder,
            self.task,
            self.datasets["train"],
            indices,
            self.datasets["test"],
            budget,
            freeze_encoder=freeze,
            seed=seed,
            head_defaults=self.s.head_defaults.get(self.task.kind),
            num_workers=self.s.num_workers,
            device=self.s.device,
            progress=self.s.progress,
            desc=desc,
        )

    def _one(self, name: str, indices: np.ndarray, fraction: float, seed: int) -> dict[str, Any]:
        run: dict[str, Any] = {"fraction": fraction, "seed": seed, "n_train": len(indices)}
        if self.linear:
            key = (name, indices.tobytes())
            if key not in self.fitted:  # e.g. 100% of the data: the same subset for every seed
                train, val, test = (self.features[split][name] for split in SPLITS)
                probe = fit_linear_probe(train.x[indices], train.y[indices], val.x, val.y, self.s.c_grid)
                self.fitted[key] = {"metrics": evaluate(probe, test.x, test.y), "c": probe.c}
            run.update(self.fitted[key])
        else:
            budget = self.s.finetune if self.s.mode == "finetune" else self.s.segmentation
            desc = f"{self.task.name} {name} {fraction:g} seed {seed}"
            run["metrics"] = self._train(
                self.encoders[name], indices, budget, self.s.mode == "linear", seed, desc
            )
        return run

    def _scratch(self) -> dict[str, Any] | None:
        budget = self.s.scratch
        if budget is None or self.s.scratch_runs < 1:
            return None
        start = time.perf_counter()
        self.say(f"task {self.task.name}: scratch baseline, {self.s.scratch_runs} run(s) on 100% of the data")
        config = next(iter(self.encoders.values())).config
        everything = np.arange(len(self.datasets["train"]))
        runs = []
        for seed in self.s.seeds[: self.s.scratch_runs]:
            encoder = random_encoder(config, self.s.random_seed + seed)
            metrics = self._train(
                encoder, everything, budget, False, seed, f"{self.task.name} scratch seed {seed}"
            )
            runs.append({"seed": seed, "metrics": metrics})
        self.timing["scratch_s"] += time.perf_counter() - start
        metric = self.task.task_kind.probed_metric
        return {
            **mean_std([r["metrics"][metric] for r in runs]),
            "budget": dataclasses.asdict(budget),
            "runs": runs,
        }

    def run(self) -> dict[str, Any]:
        """All runs of the task and their summary (the task's entry of ``report.json``)."""
        if self.task.task_kind.linear_probe:  # labels for stratification, features for linear probes
            self._extract()
        start = time.perf_counter()
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in self.encoders}
        sizes: dict[str, int] = {}
        total = len(self.datasets["train"])
        from tqdm.auto import tqdm

        jobs = len(self.s.fractions) * len(self.s.seeds) * len(self.encoders)
        # linear probes have no bar of their own; trained heads show one per run
        bar = tqdm(total=jobs, desc=f"linear probes {self.task.name}", unit="fit",
                   disable=not (self.s.progress and self.linear))  # fmt: skip
        for fraction in self.s.fractions:
            for seed in self.s.seeds:
                indices = stratified_subset(self.labels, fraction, seed, total=total)
                sizes[repr(fraction)] = len(indices)
                for name in self.encoders:
                    runs[name].append(self._one(name, indices, fraction, seed))
                    bar.update()
        bar.close()
        self.timing["probes_s"] += time.perf_counter() - start
        self.say(f"task {self.task.name}: {jobs} probes in {self.timing['probes_s']:.1f} s")
        metric = self.task.task_kind.probed_metric
        method, detail = _method(self.task, self.s)
        return {
            "kind": self.task.kind,
            "metric": metric,
            "method": method,
            "method_detail": detail,
            "data": self.specs["train"],
            "n_train": total,
            "n_val": len(self.datasets["val"]),
            "n_test": len(self.datasets["test"]),
            "seeds": list(self.s.seeds),
            "n_per_fraction": sizes,
            "summary": {name: summarise(r, metric) for name, r in runs.items()},
            "scratch": self._scratch(),
            "calibration": self.calibration or None,
            "runs": runs,
            "timing": self.timing,
        }


def next_run_dir(output_dir: str | Path) -> Path:
    """``<output_dir>/version_N`` with N one above the highest existing version."""
    root = Path(output_dir)
    versions = [int(p.name.split("_")[1]) for p in root.glob("version_*") if p.name.split("_")[1].isdigit()]
    return root / f"version_{max(versions, default=-1) + 1}"


def run_probe(settings: ProbeSettings) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run every probe of ``settings``; write the report; return it and the paths of its files."""
    start = time.perf_counter()
    encoders = {
        n: e.to(settings.device) for n, e in load_encoders(settings.encoders, settings.random_seed).items()
    }
    hashes = {name: weights_hash(encoder) for name, encoder in encoders.items()}
    cache = FeatureCache(settings.cache_dir)
    tasks = {t.name: _TaskProbe(t, encoders, hashes, cache, settings).run() for t in settings.tasks}
    report = {
        "umedpt_version": umedpt.__version__,
        "settings": dataclasses.asdict(settings),
        "encoders": {n: {"source": settings.encoders[n], "weights_sha256": hashes[n]} for n in encoders},
        "tasks": tasks,
        "feature_cache": {"directory": settings.cache_dir, "hits": cache.hits, "misses": cache.misses},
        "timing": {"total_s": time.perf_counter() - start},
    }
    return report, write_report(report, next_run_dir(settings.output_dir))
