from pathlib import Path

import numpy as np
import pytest
import torch

from workers.zoo.data import SPLIT_SEED, digits


def _reference(val_fraction: float) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return tuple(
        train_test_split(x, y, test_size=val_fraction, random_state=SPLIT_SEED, stratify=y)
    )


@pytest.mark.parametrize("val_fraction", [0.2, 0.3])
def test_digits_split_is_scikit_learns_stratified_split(val_fraction: float) -> None:
    """The stored default split (and any other fraction) is exactly scikit-learn's,
    images and labels in the same order."""
    train, val = digits(val_fraction)
    x_tr, x_va, y_tr, y_va = _reference(val_fraction)
    assert torch.equal(train.tensors[0], torch.from_numpy(x_tr))
    assert torch.equal(val.tensors[0], torch.from_numpy(x_va))
    assert torch.equal(train.tensors[1], torch.from_numpy(y_tr).long())
    assert torch.equal(val.tensors[1], torch.from_numpy(y_va).long())
    assert train.tensors[1].dtype == torch.int64


def test_digits_default_split_does_not_import_scikit_learn() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from workers.zoo.data import digits; digits(); print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_stored_digits_split_is_what_its_generator_writes(tmp_path: Path) -> None:
    """The package data is the generator's output byte for byte (regenerate with
    ``python -m workers.zoo.digits_split``), and it is scikit-learn's split."""
    from workers.zoo import digits_split

    digits_split.write(tmp_path / "split.txt")
    assert (tmp_path / "split.txt").read_bytes() == digits_split.PATH.read_bytes()
    stored, generated = digits_split.load(), digits_split.generate()
    assert all(np.array_equal(a, b) for a, b in zip(stored, generated, strict=True))
    assert len(stored[1]) == 360
    assert len(np.unique(np.concatenate(stored))) == 1797
