"""The digits split, fixed: scikit-learn's ``train_test_split(test_size=0.2,
random_state=0, stratify=y)`` over the 1797 images, stored as one permutation in
``data_files/digits_split.txt`` (the training indices in order, then the validation
indices; its first line says how many are validation).

Stored so a cold worker process reads the bundled CSV with numpy instead of importing
scikit-learn (about 3 s, paid by every Ray worker that builds the data). The file is
written by this module (``python -m workers.zoo.digits_split``) and
``tests/workers/test_data.py`` checks it against scikit-learn, so a change there
cannot go unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PATH = Path(__file__).parent / "data_files" / "digits_split.txt"
SEED = 0  # every job and every trial sees the same split
VAL_FRACTION = 0.2
PER_LINE = 20


def load() -> tuple[np.ndarray, np.ndarray]:
    """The stored (train, val) indices."""
    with PATH.open() as f:
        n_val = int(f.readline().removeprefix("#").split()[0])
        order = np.array(f.read().split(), dtype=np.int64)
    return order[:-n_val], order[-n_val:]


def generate() -> tuple[np.ndarray, np.ndarray]:
    """The split as scikit-learn computes it."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _, y = load_digits(return_X_y=True)
    train, val = train_test_split(
        np.arange(len(y)), test_size=VAL_FRACTION, random_state=SEED, stratify=y
    )
    return np.asarray(train), np.asarray(val)


def write(path: Path = PATH) -> None:
    train, val = generate()
    order = [str(int(i)) for i in np.concatenate([train, val])]
    lines = [" ".join(order[i : i + PER_LINE]) for i in range(0, len(order), PER_LINE)]
    head = f"# {len(val)} validation indices last; written by python -m workers.zoo.digits_split"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([head, *lines]) + "\n")


if __name__ == "__main__":
    write()
