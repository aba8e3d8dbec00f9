"""The character-level language model on text that ships with Python."""

from __future__ import annotations

import math

import pytest
import torch

from service.spec import DatasetSpec, JobSpec, ModelSpec
from workers.compress.train import evaluate, make_loader, train_epochs
from workers.zoo.data import build_datasets
from workers.zoo.models import build_model


def test_python_text_split_is_fixed_and_disjoint() -> None:
    spec = DatasetSpec(builtin="python-text", kwargs={"max_chars": 20_000})
    train, val = build_datasets(spec)
    _again, val2 = build_datasets(spec)
    assert torch.equal(val.tensors[0], val2.tensors[0])  # type: ignore[attr-defined]
    x, y = train[0]
    assert x.shape == y.shape == (64,)
    assert torch.equal(x[1:], y[:-1])  # targets are the next characters
    assert len(train) + len(val) == (20_000 - 1) // 64
    assert int(train.tensors[0].max()) < 128  # type: ignore[attr-defined]


@pytest.mark.slow
def test_char_lm_learns_below_uniform_perplexity() -> None:
    torch.manual_seed(0)
    train, val = build_datasets(DatasetSpec(builtin="python-text", kwargs={"max_chars": 12_000}))
    model = build_model(ModelSpec(builtin="char-lm", kwargs={"dim": 32, "depth": 1}))
    before = evaluate(model, make_loader(val, 64, shuffle=False), torch.device("cpu"))
    train_epochs(
        model, make_loader(train, 32, shuffle=True), epochs=3, lr=1e-2, device=torch.device("cpu")
    )
    after = evaluate(model, make_loader(val, 64, shuffle=False), torch.device("cpu"))
    assert after.perplexity < before.perplexity
    assert after.perplexity < 128 / 2  # well below uniform over the vocabulary
    assert math.isclose(after.perplexity, math.exp(after.loss))


def test_language_modeling_spec_defaults_to_perplexity() -> None:
    spec = JobSpec.model_validate(
        {"model": {"builtin": "char-lm"}, "dataset": {"builtin": "python-text"},
         "task": "language_modeling"}
    )  # fmt: skip
    assert spec.objectives == ["perplexity", "size_bytes"]


def test_every_task_has_a_torch_loss_and_reports_its_objective() -> None:
    """The torch part of the registry (workers/compress/train.py): the LM loss is next-token
    cross-entropy over every position, and an evaluation reports what the task says."""
    from service.tasks import get_task, task_names
    from workers.compress.train import EvalResult, task_loss

    torch.manual_seed(0)
    logits, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    for name in task_names():
        if get_task(name).needs_teacher:  # distillation: compared with outputs, not labels
            same = task_loss(name)(logits.reshape(-1, 7), logits.reshape(-1, 7), "mean")
            assert float(same) == pytest.approx(0.0, abs=1e-6)
        else:
            loss = task_loss(name)(logits, y, "mean")  # sequence outputs: per position
            flat = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), y.reshape(-1))
            assert torch.allclose(loss, flat)
        metrics = EvalResult(accuracy=0.5, loss=1.0).metrics(name)
        assert list(metrics) == list(get_task(name).reports)
        assert get_task(name).objective in metrics
    assert EvalResult(accuracy=0.5, loss=1.0).metrics("language_modeling")["perplexity"] == (
        pytest.approx(math.e)
    )
    with pytest.raises(ValueError, match="unknown task"):
        task_loss("regression")
