"""Streaming task data: any task's samples as litdata chunks, read back like a local reader.

``umedpt data optimize -c CONFIG --out DIR`` (:func:`optimize_task`) writes each task's splits,
after decoding and before augmentation, as `litdata <https://github.com/Lightning-AI/litData>`_
chunks: ``DIR/<task>/<split>/`` (``index.json`` + ``chunk-*.bin``) and ``DIR/<task>/umedpt.json``
(the task's kind, classes, channels, standardisation and split sizes, written once a split is
complete, so an interrupted run redoes only the split it was writing). A stored sample holds

- ``image``: the sample scaled to [0, 1] by its reader's normalisation (its ``to_unit`` step,
  channels set), as ``uint8`` when that loses nothing (8-bit sources), else ``uint16``
  (steps of 1/65535), or ``float32`` (``pixels="float32"``: exact);
- its targets at the stored size (``label``; ``mask`` as ``uint8`` when the values of that mask
  (class indices and ``ignore_index``) fit, else ``uint16`` / ``int32``; ``boxes`` +
  ``box_labels``; a plug-in kind's image-level keys as they are: kinds with other per-pixel
  targets are refused) and ``index``, the sample's index in its source split.

:class:`StreamingTaskDataset` (a ``litdata.StreamingDataset``) reads them back through the same
:class:`~umedpt.data.case.CasePipeline` as every reader (resize, augmentation drawn per sample,
standardisation), so in YAML it replaces a task's dataset like any other::

    data:
      class_path: umedpt.data.streaming.StreamingTaskDataset
      init_args: {input_dir: /data/optimized/ct_seg}        # or s3://bucket/optimized/ct_seg

:class:`~umedpt.data.datamodule.MultiTaskDataModule` serves it with a ``litdata``
``StreamingDataLoader`` (its own batch size, one per task, combined by the same
``CombinedLoader``); the loader's state is in every checkpoint, so a fit resumed mid-epoch
continues where it stopped. Under DDP each rank streams its own share of every task.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data.dataloader import _InfiniteConstantSampler

from umedpt.data.case import CasePipeline
from umedpt.data.loading import seeded_generator
from umedpt.data.normalize import Normalization
from umedpt.data.problems import Problem, mask_value_message
from umedpt.data.transforms import ResizeMode, TransformSpec
from umedpt.kinds import get_kind

# litdata asks PyPI for a newer version on every optimize (30 s timeout offline); umedpt pins it
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

try:
    import litdata  # noqa: E402
    from litdata import StreamingDataLoader, StreamingDataset  # noqa: E402
except ImportError as err:  # the optional extra
    raise ImportError("streaming task data needs litdata: pip install 'umedpt[streaming]'") from err

__all__ = [
    "META_FILE", "PIXELS", "StreamingTaskDataset", "encode_sample", "optimize_split", "optimize_task", "read_meta",
    "TaskStreamLoader", "is_task_folder", "stored_sample", "task_folder", "write_text",
]  # fmt: skip

# Lightning warns about any iterable dataset with a length; litdata gives each DataLoader worker
# (and rank) its own share of the chunks, so the length is exact
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning)

#: the task's description beside its split folders
META_FILE = "umedpt.json"
#: version of the stored layout (``umedpt.json`` ``format``)
FORMAT = 1
#: how stored images keep their [0, 1] values
PIXELS: tuple[str, ...] = ("auto", "uint16", "float32")
Pixels = Literal["auto", "uint16", "float32"]


def _is_remote(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def _join(root: str | os.PathLike[str], *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts]) if _is_remote(root) else str(Path(root, *parts))


def task_folder(out: str | os.PathLike[str], name: str) -> str:
    """``out/<name>``: a task's folder (or another file) under an output folder or URI."""
    return _join(out, name)


# ---------------------------------------------------------------------------------------------- writing
def stored_sample(dataset: Any, i: int) -> dict[str, Any]:
    """Sample ``i`` of ``dataset`` as it is stored: its [0, 1] image and its targets at that size.

    Raises:
        TypeError: the dataset cannot give its samples before augmentation (it has no ``stored``).
    """
    stored = getattr(dataset, "stored", None)
    if not callable(stored):
        raise TypeError(
            f"{type(dataset).__name__} cannot be optimized: it has no stored(i) giving a sample before "
            "augmentation (the file readers of umedpt.data.readers and SyntheticTaskDataset have it)"
        )
    return stored(i)


def encode_sample(sample: Mapping[str, Any], index: int, pixels: Pixels = "auto") -> dict[str, Any]:
    """The litdata item of a stored sample (see the module docstring for the layout)."""
    unit = np.asarray(sample["image"], dtype=np.float32)
    if unit.ndim != 3:
        raise ValueError(f"sample {index}: stored image must be (H, W, C), got shape {unit.shape}")
    if pixels == "float32":
        image = np.ascontiguousarray(unit)
    else:
        codes = np.rint(unit * 255.0)
        if pixels == "auto" and np.array_equal((codes / 255.0).astype(np.float32), unit):
            image = codes.astype(np.uint8)
        else:
            image = np.rint(unit * 65535.0).astype(np.uint16)
    item: dict[str, Any] = {"index": int(index), "image": image}
    for key, value in sample.items():
        if key == "image":
            continue
        if value is None:
            if key not in ("boxes", "box_labels"):
                continue  # nothing declared (e.g. no label of a self-supervised task's images)
            value = np.zeros((0, 4) if key == "boxes" else (0,))  # an image without boxes
        value = np.asarray(value)
        if key == "boxes":
            value = value.astype(np.float32).reshape(-1, 4)
        elif key == "box_labels":
            value = value.astype(np.int64)
        elif key == "mask":  # class indices and ignore_index: the smallest type that holds them
            low, high = (int(value.min()), int(value.max())) if value.size else (0, 0)
            dtype = np.int32 if low < 0 else np.uint8 if high < 256 else np.uint16 if high < 65536 else np.int32
            value = value.astype(dtype)
        item[key] = value
    return item


def _encode(dataset: Any, pixels: Pixels, index: int) -> dict[str, Any]:
    return encode_sample(stored_sample(dataset, index), index, pixels)


def task_meta(dataset: Any, task: Any) -> dict[str, Any]:
    """What a streaming reader needs to know of the task beside its samples."""
    # every convertible dataset scales its images with a CasePipeline
    normalization = getattr(getattr(dataset, "pipeline", None), "normalization", None) or Normalization()
    return {
        "format": FORMAT,
        "task": task.name,
        "kind": task.kind,
        "num_classes": int(getattr(dataset, "num_classes", task.num_classes) or task.num_classes),
        "class_names": [str(c) for c in (getattr(dataset, "class_names", None) or task.class_names or [])],
        "channels": int(getattr(dataset, "channels", 3)),
        "ignore_index": int(getattr(dataset, "ignore_index", 255)),
        "mean": np.asarray(normalization.mean, dtype=float).reshape(-1).tolist(),
        "std": np.asarray(normalization.std, dtype=float).reshape(-1).tolist(),
        "source": (task.data or {}).get("class_path"),
        "splits": {},
    }


def read_meta(input_dir: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``umedpt.json`` of an optimized task folder (local or an object-store URI).

    Raises:
        FileNotFoundError: the folder has none (it was not written by ``umedpt data optimize``).
        ValueError: the file is not valid JSON, or describes another layout version than :data:`FORMAT`.
    """
    path = _join(input_dir, META_FILE)
    if _is_remote(input_dir):
        from litdata.streaming.fs_provider import _get_fs_provider

        provider = _get_fs_provider(path, storage_options)
        if not provider.exists(path):
            raise FileNotFoundError(f"{path} not found: {input_dir} is not a task folder written by `umedpt data optimize`")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp, META_FILE)
            provider.download_file(path, str(local))
            text = local.read_text()
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found: {input_dir} is not a task folder written by `umedpt data optimize`")
        text = Path(path).read_text()
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: written in layout {meta.get('format')}, this umedpt reads and writes {FORMAT}; "
                         "optimize the task again into another --out")  # fmt: skip
    return meta


def is_task_folder(folder: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``folder`` holds a task optimized by ``umedpt data optimize`` (at least one split)."""
    try:
        return bool(read_meta(folder, storage_options).get("splits"))
    except (FileNotFoundError, ValueError):
        return False


def write_text(path: str, text: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write a small text file, local or on an object store, replacing it at once (a reader never
    sees half a file)."""
    if _is_remote(path):
        from litdata.streaming.fs_provider import _get_fs_provider

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp, "upload")
            local.write_text(text)
            _get_fs_provider(path, storage_options).upload_file(str(local), path)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    partial = Path(path + ".partial")
    partial.write_text(text)
    partial.replace(path)


def write_meta(task_dir: str, meta: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    """Write ``umedpt.json`` of a task folder."""
    write_text(_join(task_dir, META_FILE), json.dumps(meta, indent=2) + "\n", storage_options)


def optimize_split(
    dataset: Any,
    output_dir: str,
    pixels: Pixels = "auto",
    num_workers: int = 1,
    chunk_bytes: str = "64MB",
    compression: str | None = None,
    storage_options: dict[str, Any] | None = None,
    verbose: bool = True,
    mode: Literal["overwrite"] | None = None,
) -> int:
    """Write every sample of ``dataset`` as litdata chunks in ``output_dir``; returns the count.

    Uses litdata's checkpoints (``use_checkpoint``), so a run interrupted part-way continues
    from its last chunks when called again on the same folder; ``mode="overwrite"`` replaces a
    finished one.
    """
    if pixels not in PIXELS:
        raise ValueError(f"pixels must be one of {list(PIXELS)}, got {pixels!r}")
    stored_sample(dataset, 0)  # fails early, naming the dataset class, if it cannot be stored
    kind = getattr(dataset, "task_kind", None)
    unknown = sorted(set(getattr(kind, "target_keys", ())) - {"label", "mask", "boxes", "box_labels"})
    if unknown and getattr(kind, "dense", False):
        raise TypeError(
            f"kind {kind.name!r} has per-pixel targets {unknown} that the streaming reader would not resize "
            "and augment with the image; train this task from its own dataset"
        )
    litdata.optimize(
        fn=functools.partial(_encode, dataset, pixels),
        inputs=list(range(len(dataset))),
        output_dir=output_dir,
        num_workers=max(1, int(num_workers)),
        chunk_bytes=chunk_bytes,
        compression=compression,
        use_checkpoint=True,
        keep_data_ordered=True,
        reorder_files=False,
        start_method="fork" if os.name == "posix" else None,
        storage_options=dict(storage_options or {}),
        verbose=verbose,
        mode=mode,
    )
    return len(dataset)


def _written_samples(split_dir: str) -> int | None:
    """Samples in a finished litdata index of a local split folder (None: none there)."""
    if _is_remote(split_dir):
        return None
    index = Path(split_dir, "index.json")
    if not index.is_file():
        return None
    try:
        return sum(int(chunk["chunk_size"]) for chunk in json.loads(index.read_text())["chunks"])
    except (ValueError, KeyError, TypeError):
        return -1  # unreadable: written again


def optimize_task(
    task: Any,
    dataset_for: Callable[[str], Any],
    out: str | os.PathLike[str],
    splits: Sequence[str] = ("train", "val", "test"),
    pixels: Pixels = "auto",
    num_workers: int = 1,
    chunk_bytes: str = "64MB",
    compression: str | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Optimize the ``splits`` of ``task`` into ``out/<task.name>``; returns its ``umedpt.json``.

    ``dataset_for(split)`` builds the task's dataset of a split (without augmentation draws:
    :meth:`stored` gives samples before them). A split already recorded complete in
    ``umedpt.json`` is skipped (``overwrite`` redoes it); one whose writing was interrupted
    continues from litdata's checkpoint.
    """
    task_dir = task_folder(out, task.name)
    try:
        meta = read_meta(task_dir, storage_options)
    except FileNotFoundError:
        meta = None
    for split in splits:
        if meta is not None and split in meta.get("splits", {}) and not overwrite:
            log(f"{task.name} {split}: {meta['splits'][split]['samples']} samples already optimized, skipped")
            continue
        dataset = dataset_for(split)
        split_dir = _join(task_dir, split)
        meta = _current_meta(meta, task_meta(dataset, task), task_dir, overwrite, log)
        start = time.perf_counter()
        written = None if overwrite else _written_samples(split_dir)
        if written == len(dataset):  # litdata finished the split, umedpt.json was not updated yet
            log(f"{task.name} {split}: {written} samples found complete in {split_dir}, recorded")
            count, stored_as = written, "as found"
        else:
            # a finished index of another size (or --overwrite): write the split again
            mode = "overwrite" if written is not None or overwrite else None
            if mode and not _is_remote(split_dir):
                shutil.rmtree(split_dir, ignore_errors=True)
                mode = None
            log(f"{task.name} {split}: optimizing {len(dataset)} samples -> {split_dir}")
            try:
                count = optimize_split(dataset, split_dir, pixels, num_workers, chunk_bytes, compression, storage_options, mode=mode)
            except Exception as err:  # litdata reports a worker's failure as a RuntimeError with its traceback
                hint = (" (an object-store split that umedpt.json does not record as finished is not resumed: "
                        "write it again with --overwrite)") if _is_remote(split_dir) else ""  # fmt: skip
                raise RuntimeError(f"task {task.name!r} ({split} split): writing {split_dir} failed{hint}: {err}") from err
            stored_as = pixels
        seconds = time.perf_counter() - start
        meta["splits"][split] = {"samples": count, "pixels": stored_as, "seconds": round(seconds, 2)}
        write_meta(task_dir, meta, storage_options)
        log(f"{task.name} {split}: {count} samples in {seconds:.1f} s")
    if meta is None:
        raise ValueError(f"task {task.name!r}: no split to optimize (splits={list(splits)})")
    return meta


#: what a task folder's splits must share (umedpt.json): written once, checked for every split
SHARED_FIELDS = ("kind", "num_classes", "class_names", "channels", "ignore_index", "mean", "std")


def _current_meta(meta: dict[str, Any] | None, fresh: dict[str, Any], task_dir: str, overwrite: bool,
                  log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """The task folder's description for a split about to be written: the stored one when the
    dataset agrees with it; the dataset's with ``overwrite`` (the splits written under the old one
    are dropped from it); else an error naming the fields that differ."""
    if meta is None:
        return fresh
    changed = [f for f in SHARED_FIELDS if meta.get(f) != fresh.get(f)]
    if not changed:
        return meta
    if not overwrite:
        details = "; ".join(f"{f}: stored {meta.get(f)!r}, now {fresh.get(f)!r}" for f in changed)
        raise ValueError(f"{task_dir}: the task's data no longer matches its optimized splits ({details}); "
                         "write every split again with --overwrite, or use another --out")  # fmt: skip
    for split in meta.get("splits", {}):  # written under the old description: not kept
        if not _is_remote(task_dir):
            shutil.rmtree(Path(task_dir, split), ignore_errors=True)
    if meta.get("splits"):
        log(f"{task_dir}: {', '.join(changed)} changed; the splits {sorted(meta['splits'])} written before are removed")
    return fresh


# ---------------------------------------------------------------------------------------------- reading
class StreamingTaskDataset(StreamingDataset):
    """One split of a task optimized by ``umedpt data optimize``, streamed with litdata.

    A ``litdata.StreamingDataset`` (an iterable dataset that also indexes: ``dataset[i]`` is case
    ``i`` of the stored order) whose items are umedpt case dicts, like any reader's: resized to
    ``image_size``, augmented by ``transform`` in the training split (each sample's draw depends
    on the task's seed, the epoch and the sample, not on workers or ranks), standardised by the
    source task's ``mean`` / ``std`` unless given.

    Args:
        input_dir: the task's folder (``OUT/<task>``: local, or an object-store URI litdata reads).
        split: ``train``, ``val`` or ``test``.
        image_size: side of the square images returned; None keeps the stored size.
        transform: augmentation preset or list (see :mod:`umedpt.data.transforms`), training only.
        resize: ``stretch`` or ``letterbox``.
        mean: standardisation mean (default: the source task's).
        std: standardisation standard deviation (default: the source task's).
        cache_dir: where remote chunks are cached (litdata's default when None).
        max_cache_size: litdata's chunk cache limit (e.g. ``"50GB"``).
        storage_options: object-store credentials and options, as litdata takes them.

    Raises:
        FileNotFoundError: ``input_dir`` has no ``umedpt.json``.
        ValueError: the split was not optimized, or the folder's layout is another version's (:func:`read_meta`).
    """

    def __init__(
        self,
        input_dir: str,
        split: str = "train",
        image_size: int | None = 224,
        transform: TransformSpec = "none",
        resize: ResizeMode = "stretch",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        cache_dir: str | None = None,
        max_cache_size: int | str = "100GB",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        meta = read_meta(input_dir, storage_options)
        if split not in meta.get("splits", {}):
            done = sorted(meta.get("splits", {}))
            raise ValueError(
                f"{input_dir}: split {split!r} was not optimized (optimized: {done}); run `umedpt data optimize "
                f"-c CONFIG --out {str(input_dir).rstrip('/').rsplit('/', 1)[0]} --splits {split}`"
            )
        super().__init__(
            _join(input_dir, split), cache_dir=cache_dir, max_cache_size=max_cache_size,
            storage_options=dict(storage_options or {}), shuffle=False, drop_last=False,
        )  # fmt: skip
        self.input_dir_spec = str(input_dir)
        self.meta = meta
        self.split = split
        self.kind: str = meta["kind"]
        self.task_kind = get_kind(self.kind)
        self.num_classes = int(meta["num_classes"])
        self.class_names = list(meta.get("class_names") or [str(i) for i in range(self.num_classes)])
        self.channels = int(meta["channels"])
        self.ignore_index = int(meta.get("ignore_index", 255))
        self.image_size = image_size
        normalization = Normalization(method="unit", mean=meta["mean"] if mean is None else mean,
                                      std=meta["std"] if std is None else std)  # fmt: skip
        #: stored [0, 1] pixels -> case: the readers' resize + augmentation + standardisation
        self.pipeline = CasePipeline(
            normalization, self.channels, image_size, transform, resize, train=split == "train",
            boxes="boxes" in self.task_kind.target_keys, ignore_index=self.ignore_index,
        )  # fmt: skip
        self.normalization = normalization
        #: seed of the augmentation draws (the data module gives each task its own)
        self.augment_seed = 0

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        if isinstance(index, slice):
            return [self.case(i) for i in item]
        return self.case(item)

    def stored_item(self, i: int) -> dict[str, Any]:
        """Stored item ``i`` as written (before the case pipeline)."""
        return super().__getitem__(int(i))

    def case(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """The case dict of a stored item; its augmentation depends only on ``(augment_seed,
        epoch, index)``, so any worker, rank or resumed run draws the same one."""
        keys = self.task_kind.target_keys
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"{self.meta.get('task', '?')} {self.split} sample {item.get('index')}: stored item has no "
                             f"{missing} (it has {sorted(item)}); was it optimized as a {self.kind} task?")  # fmt: skip
        masks = {"mask": item["mask"]} if "mask" in keys else None
        boxes = {"boxes": (item["boxes"], item["box_labels"])} if "boxes" in keys else None
        seed = None
        if self.pipeline.random:
            generator = seeded_generator(self.augment_seed, int(self.current_epoch), int(item["index"]))
            seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        case = self.pipeline(np.asarray(item["image"]), masks=masks, boxes=boxes, seed=seed)
        targets = self.stored_targets(item)
        if masks is not None:
            targets["mask"] = case.masks["mask"]
        if boxes is not None:
            targets["boxes"], targets["box_labels"] = case.boxes["boxes"]
        return {"image": case.image, **self.task_kind.case_targets(**targets)}

    @staticmethod
    def stored_targets(item: Mapping[str, Any]) -> dict[str, Any]:
        """A stored item's targets by key, class labels as Python numbers (as the kinds take them)."""
        return {k: v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v
                for k, v in item.items() if k not in ("image", "index")}  # fmt: skip

    def item_problems(self, item: Mapping[str, Any]) -> list[Problem]:
        """What is wrong with one stored item: its image's shape, labels out of range, mask
        values that are not class indices, boxes outside the image or empty."""
        where = f"{self.meta.get('task', '?')} {self.split} sample {int(item.get('index', -1))}"
        image = np.asarray(item.get("image"))
        allowed = (1, self.channels)  # grey images are stored grey and repeated after augmentation
        if image.ndim != 3 or image.shape[-1] not in allowed:
            return [Problem(where, "image", f"stored image has shape {image.shape}, expected (H, W, C) with C in {sorted(set(allowed))}")]
        targets = self.stored_targets(item)
        problems = [Problem(where, field, message) for field, message in
                    self.task_kind.target_problems(targets, self.num_classes, self.class_names, size=image.shape[:2])]  # fmt: skip
        if "mask" in targets:
            mask = np.asarray(targets["mask"])
            if mask.shape != image.shape[:2]:
                problems.append(Problem(where, "mask", f"size {mask.shape} differs from the image's {image.shape[:2]}"))
            message = mask_value_message(mask, self.num_classes, self.ignore_index)
            if message:
                problems.append(Problem(where, "mask", message))
        return problems

    def problems(self, deep: bool = False) -> list[Problem]:
        """Problems of the stored items: every item when ``deep``, else the first 32."""
        count = len(self) if deep else min(len(self), 32)
        return [p for i in range(count) for p in self.item_problems(self.stored_item(i))]

    def dataloader(self, batch_size: int, num_workers: int, collate_fn: Callable, pin_memory: bool = False,
                   train: bool = False, seed: int = 0) -> TaskStreamLoader:  # fmt: skip
        """A ``litdata.StreamingDataLoader`` of this split: shuffled with ``seed`` and incomplete
        batches dropped when ``train``; its :meth:`state_dict` (the position in the epoch) goes
        into every checkpoint."""
        self.set_shuffle(train)
        self.set_drop_last(train)
        self.seed = seed
        self.augment_seed = seed
        return TaskStreamLoader(
            self, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory,
            # the loader's own stream for its worker seeds: starting an iteration must not draw from
            # the global stream that stochastic depth uses (a resumed run starts its loaders elsewhere in it)
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip


class _EpochSampler(_InfiniteConstantSampler):
    """The sampler slot of a :class:`TaskStreamLoader`: Lightning calls ``set_epoch`` on a
    loader's sampler before each epoch; this one keeps the epoch for the loader (and for
    :class:`~umedpt.data.loading.TaskSubsetLoader`, which draws its task subsets by epoch)."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class TaskStreamLoader(StreamingDataLoader):
    """litdata's ``StreamingDataLoader`` that resumes where Lightning's epochs say it should.

    litdata's loader knows its own passes, not Lightning's epochs. Three things make a resumed
    fit continue exactly as the uninterrupted one:

    - it knows Lightning's epoch (``sampler.set_epoch``, which Lightning calls before every
      epoch) and stores it in its state; a position loaded from a checkpoint written at the end
      of an epoch is dropped when the next epoch starts, as the uninterrupted run starts a new
      pass there (a task that cycles within an epoch is part-way through a pass at its end);
    - a loaded position is used by the first pass after loading only: after ``load_state_dict``
      litdata replays it until a pass runs to its end, and Lightning ends an epoch after the
      loader's length without asking for one more batch, so every later epoch would replay it
      (the pitfall of litData issue #770);
    - when Lightning iterates the loader at the start of an epoch, its position reads "nothing
      served in this pass" from then on, not only from the task's first batch: with
      ``tasks_per_step`` a task may not be drawn for a while, and a checkpoint written in between
      must not continue the previous epoch's pass.
    """

    _resume_pending = False
    _resumed_epoch: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # DataLoader refuses a sampler for iterable datasets and guards the attribute afterwards;
        # batches still come from its own batch sampler, this object only takes the epoch
        object.__setattr__(self, "sampler", _EpochSampler())

    @property
    def epoch(self) -> int:
        """Lightning's epoch, as last set by ``sampler.set_epoch``."""
        return self.sampler.epoch

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lightning_epoch"] = self._resumed_epoch if self._resume_pending else self.epoch
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._resume_pending = bool(self.restore)
        self._resumed_epoch = obj.get("lightning_epoch")

    def __iter__(self) -> Any:
        if self._resume_pending:
            return self._resumed_pass()
        self.restore = False
        self._num_samples_yielded_streaming = 0
        return super().__iter__()

    def _resumed_pass(self) -> Any:
        # decided at the first batch: a resumed fit creates its iterator before Lightning sets the epoch
        self._resume_pending = False
        if self._resumed_epoch is not None and self._resumed_epoch != self.epoch:
            self.restore = False
            self._num_samples_yielded_streaming = 0
        yield from super().__iter__()
