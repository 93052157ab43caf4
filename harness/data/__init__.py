"""Data layer: dataset specs, readers, class-disjoint splits, sampler, transforms, image cache, loaders.

Datasets are declared in ``datasets/<name>.yaml`` (a data folder, not a Python package) and
parsed by a reader in :mod:`harness.data.readers`. :func:`load_splits` turns the reader's raw
class-disjoint train/test split into the run's splits (SPECS 1). Modules, bottom to top:
``table`` (ImageTable, Splits) <- ``readers`` <- ``specs`` <- ``splits``; ``sampler``,
``transforms``, ``images`` and ``augment`` are independent; ``decode`` and ``pipeline`` (the
batches on the device, either pipeline) build on them; ``loaders`` puts them together.
"""

from harness.data.images import ImageDataset, crop_box, read_all
from harness.data.loaders import loader_workers, make_loaders, set_epoch, split_batches
from harness.data.pipeline import Batches, BatchTransform, resolve_pipeline
from harness.data.sampler import ClassBalancedBatchSampler
from harness.data.specs import DatasetSpec, get_spec, resolve_root, spec_names
from harness.data.splits import (
    check_dataset,
    class_groups,
    evaluation_tables,
    load_splits,
    n_val_classes,
    verify_splits,
    verify_tables,
)
from harness.data.table import ImageTable, Splits
from harness.data.transforms import make_transform

__all__ = [
    "Batches",
    "BatchTransform",
    "resolve_pipeline",
    "split_batches",
    "ClassBalancedBatchSampler",
    "DatasetSpec",
    "ImageDataset",
    "ImageTable",
    "Splits",
    "check_dataset",
    "class_groups",
    "crop_box",
    "read_all",
    "get_spec",
    "load_splits",
    "loader_workers",
    "make_loaders",
    "make_transform",
    "n_val_classes",
    "resolve_root",
    "set_epoch",
    "spec_names",
    "verify_splits",
    "verify_tables",
    "evaluation_tables",
]
