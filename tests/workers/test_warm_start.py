"""Warm start: the float baseline from the user's own weights instead of trained from
scratch (``baseline.weights``), through the baseline task itself (no Ray: the same
function Ray runs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service import weights as wt
from service.settings import get_settings
from service.spec import JobSpec
from workers.errors import SpecError
from workers.jobs.baseline import Baseline, load_baseline, load_weights, train_baseline
from workers.zoo.models import build_model

SPEC = {
    "model": {"builtin": "digits-mlp", "kwargs": {"hidden": 32}},
    "dataset": {"builtin": "digits"},
    "baseline": {"epochs": 3},
}


@pytest.fixture(autouse=True)
def weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The test's directory is where server paths may be read from (the environment's
    settings, as a baseline task without the driver's roots reads them)."""
    monkeypatch.setenv("SPARQ_WEIGHTS_DIRS", str(tmp_path))
    monkeypatch.setenv("SPARQ_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def trained() -> Baseline:
    return train_baseline(SPEC)


def _with(weights: Path, **baseline: object) -> dict[str, object]:
    return {**SPEC, "baseline": {"weights": str(weights), **baseline}}


def test_given_weights_are_the_baseline_as_they_are(trained: Baseline, tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({k: torch.from_numpy(v) for k, v in trained.state.items()}, path)
    warm = train_baseline(_with(path))  # epochs default to 0 with weights
    assert warm.accuracy == trained.accuracy
    assert warm.size_bytes == trained.size_bytes
    assert warm.train_loss is None
    assert warm.warm_start == str(path)
    for k, v in trained.state.items():
        assert np.array_equal(warm.state[k], v)


def test_weights_in_a_checkpoint_dict_or_npz(trained: Baseline, tmp_path: Path) -> None:
    state = {k: torch.from_numpy(v) for k, v in trained.state.items()}
    torch.save({"state_dict": state, "epoch": 7}, tmp_path / "ckpt.pth")
    np.savez(tmp_path / "w.npz", **dict[str, Any](trained.state))
    for name in ("ckpt.pth", "w.npz"):
        assert train_baseline(_with(tmp_path / name)).accuracy == trained.accuracy


def test_given_weights_can_be_trained_further(trained: Baseline, tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({k: torch.from_numpy(v) for k, v in trained.state.items()}, path)
    more = train_baseline(_with(path, epochs=2))
    assert more.train_loss is not None
    spec = JobSpec.model_validate(_with(path, epochs=2))
    start = load_baseline(spec, trained.state)
    moved = load_baseline(spec, more.state)
    first = next(iter(trained.state))
    assert not torch.equal(start.state_dict()[first], moved.state_dict()[first])


def test_weights_that_do_not_fit_name_the_field_and_the_keys(tmp_path: Path) -> None:
    torch.save({"1.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    with pytest.raises(SpecError, match=r"baseline.weights=.*does not fit the model") as e:
        train_baseline(_with(tmp_path / "bad.pt"))
    assert "missing ['1.bias'" in str(e.value)
    assert "1.weight: (3, 3) given" in str(e.value)


def test_weights_holding_objects_are_refused_not_unpickled(tmp_path: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (print, ("unpickled!",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(SpecError, match="cannot be read as a state dict"):
        train_baseline(_with(tmp_path / "evil.pt"))


def test_spec_rules() -> None:
    with pytest.raises(ValueError, match="epochs=0 needs `weights`"):
        JobSpec.model_validate({**SPEC, "baseline": {"epochs": 0}})
    with pytest.raises(ValueError, match="absolute path"):
        JobSpec.model_validate({**SPEC, "baseline": {"weights": "rel/w.pt"}})
    with pytest.raises(ValueError, match="ending in one of"):
        JobSpec.model_validate({**SPEC, "baseline": {"weights": "/w.bin"}})
    assert JobSpec.model_validate({**SPEC, "baseline": {}}).baseline.train_epochs == 40


def _linear_state(path: Path) -> None:
    model = build_model(JobSpec.model_validate(SPEC).model)
    torch.save(model.state_dict(), path)


def test_the_task_reads_an_upload_by_its_id(tmp_path: Path) -> None:
    roots = wt.Roots(home=str(tmp_path / "svc"))
    roots.uploads.mkdir(parents=True)
    _linear_state(tmp_path / "up.pt")
    meta = wt.keep(
        roots,
        tmp_path / "up.pt",
        suffix=".pt",
        owner="alice",
        sha256="0" * 64,
        size_bytes=1,
        filename="up.pt",
    )
    assert (
        wt.check(meta["id"], roots, None, owner_checked=False)
        == (roots.uploads / f"{meta['id']}.pt").resolve()
    )
    model = build_model(JobSpec.model_validate(SPEC).model)
    load_weights(model, meta["id"], roots)  # the driver's roots: the service's home
    with pytest.raises(SpecError, match="no uploaded weights with this id"):
        load_weights(model, "w-" + "0" * 16, roots)


def test_the_task_checks_a_server_path_again(tmp_path: Path) -> None:
    """Defence in depth: the baseline task refuses a path outside SPARQ_WEIGHTS_DIRS
    (a symlink inside that points out included) even if the service let it through."""
    inside, outside = tmp_path / "dir", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    _linear_state(outside / "w.pt")
    (inside / "link.pt").symlink_to(outside / "w.pt")
    roots = wt.Roots(home=str(tmp_path / "svc"), dirs=(str(inside),))
    model = build_model(JobSpec.model_validate(SPEC).model)
    for path in (outside / "w.pt", inside / "link.pt"):
        with pytest.raises(SpecError, match="SPARQ_WEIGHTS_DIRS once symlinks"):
            load_weights(model, str(path), roots)
    _linear_state(inside / "w.pt")
    load_weights(model, str(inside / "w.pt"), roots)
