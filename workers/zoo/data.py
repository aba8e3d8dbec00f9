"""Builtin datasets (shipped with dependencies; nothing is downloaded) and the
resolution of a dataset spec to ``(train, val)`` torch datasets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from service.spec import DatasetSpec
from workers.errors import SpecError
from workers.zoo import digits_split
from workers.zoo.models import import_entrypoint

SPLIT_SEED = digits_split.SEED  # fixed: every job and every trial sees the same split


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 images and labels from the CSV bundled with scikit-learn, read with
    numpy: ``find_spec`` locates the package without importing it."""
    import importlib.util
    from pathlib import Path

    found = importlib.util.find_spec("sklearn")
    if found is None or found.origin is None:
        raise SpecError("dataset 'digits' needs scikit-learn installed (it ships the images)")
    data = np.loadtxt(Path(found.origin).parent / "datasets/data/digits.csv.gz", delimiter=",")
    return data[:, :-1], data[:, -1].astype(np.int64)


def digits(val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits (1797 images), scaled to [0, 1], as 1x8x8.

    The split is stratified and seeded, so it is the same on every machine. The
    default split is stored (:mod:`workers.zoo.digits_split`); another fraction is
    computed with scikit-learn.
    """
    x, y = _digits_arrays()
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    if val_fraction == digits_split.VAL_FRACTION:
        train_idx, val_idx = digits_split.load()
    else:
        from sklearn.model_selection import train_test_split

        train_idx, val_idx = train_test_split(
            np.arange(len(y)), test_size=val_fraction, random_state=SPLIT_SEED, stratify=y
        )
    return (
        TensorDataset(torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx])),
        TensorDataset(torch.from_numpy(x[val_idx]), torch.from_numpy(y[val_idx])),
    )


def _python_text(**kwargs: Any) -> tuple[Dataset, Dataset]:
    from workers.zoo.lm import python_text_dataset

    return python_text_dataset(**kwargs)


def _python_sentences(**kwargs: Any) -> tuple[Dataset, Dataset]:
    from workers.zoo.minilm import python_sentences

    return python_sentences(**kwargs)


BUILTINS: dict[str, Callable[..., tuple[Dataset, Dataset]]] = {
    "digits": digits,
    "python-text": _python_text,
    "python-sentences": _python_sentences,
}


def build_datasets(
    spec: DatasetSpec, allowed: tuple[str, ...] | None = None
) -> tuple[Dataset, Dataset]:
    """The (train, val) datasets a spec names; an entrypoint only if allowed
    (``$SPARQ_ENTRYPOINT_MODULES`` unless ``allowed`` is given)."""
    fn = (
        BUILTINS[spec.builtin]
        if spec.builtin
        else import_entrypoint(str(spec.entrypoint), "dataset.entrypoint", allowed)
    )
    out = fn(**spec.kwargs)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise SpecError(
            f"dataset {spec.label!r} must return (train, val), got {type(out).__name__}"
        )
    return out[0], out[1]
