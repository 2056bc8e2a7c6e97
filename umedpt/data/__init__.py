"""Datasets, loaders and the embedded synthetic default data."""

from umedpt.data.datamodule import MultiTaskDataModule
from umedpt.data.loading import EpochShuffleSampler, collate_cases

__all__ = ["EpochShuffleSampler", "MultiTaskDataModule", "collate_cases"]
