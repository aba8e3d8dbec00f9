"""Inputs and outputs as users hold them (issue 14, item 2): dataset items that are
tensors, tuples or dicts of tensors; models that take keyword inputs and return
tensors, tuples, dicts or ``ModelOutput``s. Every loop (baseline, trial, re-evaluation,
the dependency graph, BOPs) goes through ``workers.compress.batch``; such models are
pruned, quantized, exported and reloaded exactly, and ONNX says why it cannot export
one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from search_spaces import Policy
from service.spec import JobSpec
from tests import held
from workers.compress import batch as B
from workers.jobs import checkpoint as ckpt
from workers.jobs.baseline import (
    describe_model,
    evaluate_bytes,
    reevaluate,
    save_baseline,
    teacher_for,
    train_baseline,
)
from workers.jobs.onnx_export import OnnxExportError
from workers.jobs.trial import compress

CPU = torch.device("cpu")


def test_a_batch_is_split_called_and_its_output_picked() -> None:
    x, y = torch.ones(3, 4), torch.tensor([0, 1, 2])
    assert B.split(x).labels is None
    assert B.split(x).inputs is x
    assert B.split((x, y)).labels is y
    assert B.split([x]).labels is None
    b = B.split({"input_ids": x.long(), "attention_mask": x.long(), "labels": y})
    assert b.labels is y
    assert sorted(b.inputs) == ["attention_mask", "input_ids"]
    assert b.size == 3
    assert b.attention_mask is not None
    logits, hidden = torch.zeros(3, 2), torch.ones(3, 5, 4)
    assert B.output_of(logits) == ("output", logits)
    assert B.output_of((logits, hidden))[1] is logits
    assert B.output_of(held.Output(last_hidden_state=hidden, logits=logits)) == ("logits", logits)
    assert B.output_of({"pooler_output": logits, "last_hidden_state": hidden})[0] == (
        "last_hidden_state"
    )
    with pytest.raises(TypeError, match="no tensor output"):
        B.output_of({"n": 3})
    with pytest.raises(Exception, match="a mapping input must hold tensors only"):
        B.split({"input_ids": x, "note": "text"})
    ex = B.example(held.token_dicts()[0])
    assert isinstance(ex, dict)
    assert ex["input_ids"].shape == (1, 12)
    desc = B.describe_example(ex)
    back = B.rebuild_example(desc)
    assert isinstance(back, dict)
    assert {k: (v.shape, v.dtype) for k, v in back.items()} == {
        k: (v.shape, v.dtype) for k, v in ex.items()
    }
    assert bool((back["attention_mask"] == 1).all())


def test_transformers_model_output_is_read_as_a_mapping() -> None:
    outputs = pytest.importorskip("transformers.modeling_outputs")
    logits = torch.randn(2, 3)
    out = outputs.SequenceClassifierOutput(logits=logits)
    assert B.output_of(out) == ("logits", logits)
    hidden = torch.randn(2, 4, 8)
    base = outputs.BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=logits)
    assert B.output_of(base) == ("last_hidden_state", hidden)


def _spec(net: str, data: str, **extra: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": {"entrypoint": f"tests.held:{net}", **extra.pop("model", {})},
            "dataset": {"entrypoint": f"tests.held:{data}"},
            "baseline": {"epochs": 3, **extra.pop("baseline", {})},
            "search_space": {"finetune_epochs": 1},
            **extra,
        }
    )


def _policy(spec: JobSpec, bits: int = 4, channels: float = 0.0) -> Policy:
    desc = describe_model(spec)
    layers = {layer["name"]: {"bits": bits, "sparsity": 0.25} for layer in desc.layers}
    chans = {g["name"]: channels for g in desc.groups} if channels else {}
    return Policy.model_validate({"layers": layers, "noise_rate": 0.5, "channels": chans})


@pytest.mark.parametrize(
    ("model", "dataset"),
    [
        ("pixel_net", "digits_dicts"),
        ("tuple_net", "digits_dicts"),
        ("token_encoder", "token_dicts"),
    ],
)
def test_a_model_as_users_hold_it_trains_compresses_and_reloads_exactly(
    model: str, dataset: str
) -> None:
    spec = _spec(model, dataset)
    if model == "tuple_net":  # a tuple-returning model called with one tensor: dict items
        spec = _spec(model, "digits_unlabelled")  # unlabelled items cannot train it...
        with pytest.raises(ValueError, match="needs labels"):
            train_baseline(spec.model_dump(mode="json"))
        spec = JobSpec.model_validate(
            {**spec.model_dump(mode="json"), "dataset": {"builtin": "digits"}}
        )
    base = train_baseline(spec.model_dump(mode="json"))
    assert base.train_loss is not None
    assert base.start_quality is not None
    assert base.accuracy > base.start_quality  # it learned, from items as they are
    desc = describe_model(spec)
    policy = _policy(spec, channels=0.25 if desc.groups else 0.0)
    data, metrics = compress(spec, policy, base.state, CPU, seed=0)
    header, _ = ckpt.read_header(data)
    assert ("inputs" in header["example"]) == (model != "tuple_net")
    if policy.channels:
        assert header["pruning"]  # pruned through the graph traced on the items
    again = evaluate_bytes(data, spec, CPU)
    assert again.accuracy == metrics["accuracy"]
    assert again.loss == metrics["loss"]
    assert metrics["bops"] > 0


def test_distillation_matches_the_teacher_and_reloads_to_its_cosine(tmp_path: Any) -> None:
    spec = _spec(
        "token_encoder",
        "token_dicts",
        model={"pretrained": True, "kwargs": {"classify": False}},
        baseline={"epochs": 0},
        task="distillation",
    )
    assert spec.objectives == ["cosine", "size_bytes"]
    assert spec.search_space.finetune_lr == pytest.approx(3e-5)  # a pretrained model's
    base = train_baseline(spec.model_dump(mode="json"))
    assert base.accuracy == pytest.approx(1.0, abs=1e-6)  # the teacher is itself
    assert base.train_loss is None  # measured as it arrived
    spec = JobSpec.model_validate(
        {
            **spec.model_dump(mode="json"),
            "search_space": {"finetune_lr": 1e-3, "finetune_epochs": 2},
        }
    )
    data, metrics = compress(spec, _policy(spec, bits=2), base.state, CPU, seed=0)
    assert 0.0 < metrics["cosine"] < 0.999
    assert metrics["accuracy"] == metrics["cosine"]
    teacher = teacher_for(spec, base.state)
    again = evaluate_bytes(data, spec, CPU, teacher)
    assert again.cosine == metrics["cosine"]
    # the export's re-evaluation finds the teacher kept next to the checkpoint
    save_baseline(tmp_path, base)
    (tmp_path / "best.sparq").write_bytes(data)
    re = reevaluate(str(tmp_path / "best.sparq"), spec.model_dump(mode="json"))
    assert re.accuracy == metrics["accuracy"]
    # without fine-tuning toward the teacher, the student is further from it
    lazy = JobSpec.model_validate(
        {**spec.model_dump(mode="json"), "search_space": {"finetune_epochs": 0}}
    )
    _, untuned = compress(lazy, _policy(spec, bits=2), base.state, CPU, seed=0)
    assert untuned["cosine"] < metrics["cosine"]


def test_distillation_of_logits_is_kl_and_agreement() -> None:
    spec = _spec(
        "pixel_net",
        "digits_unlabelled",
        model={"pretrained": True},
        baseline={"epochs": 0},
        task="distillation",
    )
    base = train_baseline(spec.model_dump(mode="json"))
    _data, metrics = compress(spec, _policy(spec, bits=2), base.state, CPU, seed=0)
    # pixel_net takes pixel_values=: unlabelled tensors are passed positionally
    assert metrics["accuracy"] != metrics["cosine"]  # agreement, not cosine
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_onnx_says_why_a_keyword_input_model_is_not_exported(tmp_path: Any) -> None:
    from workers.jobs.onnx_export import export_qdq

    spec = _spec("token_encoder", "token_dicts", baseline={"epochs": 1})
    base = train_baseline(spec.model_dump(mode="json"))
    data, _ = compress(spec, _policy(spec, bits=8), base.state, CPU, seed=0)
    ck = ckpt.decode(data, model=held.token_encoder())
    inputs = B.first_n(held.token_dicts()[1], 8)
    with pytest.raises(OnnxExportError, match="keyword inputs"):
        export_qdq(ck, tmp_path / "m.onnx", inputs)
    tuple_spec = _spec("tuple_net", "digits_dicts")
    tuple_spec = JobSpec.model_validate(
        {
            **tuple_spec.model_dump(mode="json"),
            "dataset": {"builtin": "digits"},
            "baseline": {"epochs": 1},
        }
    )
    tb = train_baseline(tuple_spec.model_dump(mode="json"))
    tdata, _ = compress(tuple_spec, _policy(tuple_spec, bits=8), tb.state, CPU, seed=0)
    with pytest.raises(OnnxExportError, match="returns tuple"):
        export_qdq(
            ckpt.decode(tdata, model=held.tuple_net()), tmp_path / "t.onnx", torch.rand(4, 1, 8, 8)
        )


@pytest.mark.parametrize("method", ["ipq", "geta", "mx"])
def test_every_kind_of_fine_tune_distills_keyword_input_models(method: str) -> None:
    """The handlers' own loops (iPQ's stages, GETA's steps) read batches as users hold
    them and train toward the teacher too."""
    geta = {
        "warmup_steps": 2,
        "projection_steps": 2,
        "projection_periods": 1,
        "joint_steps": 2,
        "pruning_periods": 1,
        "cooldown_steps": 2,
    }
    spec = JobSpec.model_validate(
        {
            "model": {
                "entrypoint": "tests.held:token_encoder",
                "kwargs": {"classify": False},
                "pretrained": True,
            },
            "dataset": {"entrypoint": "tests.held:token_dicts"},
            "task": "distillation",
            "search_space": {
                "method": method,
                "finetune_epochs": 1,
                "ipq": {"block_sizes": [4], "centroids": [8]},
                "geta": geta,
            },
        }
    )
    base = train_baseline(spec.model_dump(mode="json"))
    desc = describe_model(spec)
    layers = {layer["name"]: {"bits": 4, "sparsity": 0.0} for layer in desc.layers}
    knobs: dict[str, Any] = {"name": method}
    if method == "ipq":
        knobs.update(block=4, centroids=8)
    policy = Policy.model_validate({"layers": layers, "noise_rate": 0.5, "method": knobs})
    data, metrics = compress(spec, policy, base.state, CPU, seed=0)
    assert 0.0 < metrics["cosine"] <= 1.0
    again = evaluate_bytes(data, spec, CPU, teacher_for(spec, base.state))
    assert again.cosine == metrics["cosine"]


def test_distillation_by_mse_reports_cosine_as_its_quality() -> None:
    spec = _spec(
        "token_encoder",
        "token_dicts",
        model={"pretrained": True, "kwargs": {"classify": False}},
        baseline={"epochs": 0},
        task="distillation",
        distillation={"loss": "mse"},
    )
    base = train_baseline(spec.model_dump(mode="json"))
    assert base.loss == pytest.approx(0.0, abs=1e-12)  # its own teacher: no error
    _, metrics = compress(spec, _policy(spec, bits=2), base.state, CPU, seed=0)
    assert metrics["accuracy"] == metrics["cosine"] < 1.0
    assert metrics["loss"] > 0.0  # mean squared error of the pooled embeddings
    assert metrics["loss"] != pytest.approx(1.0 - metrics["cosine"])


def test_sparq_evaluate_measures_a_distillation_checkpoint_against_its_own_teacher(
    tmp_path: Any,
) -> None:
    """The checkpoint says which teacher its job had and by which loss. A job that
    distilled from ``baseline.weights`` (not in the checkpoint) is measured against
    them when given (``--teacher``), and refused without them, never measured against
    the model as its spec builds it (another teacher, another cosine)."""
    from service.cli import evaluate_checkpoint

    torch.manual_seed(0)
    teacher_model = held.token_encoder(classify=False)
    for p in teacher_model.parameters():  # trained weights: not the spec's own model
        p.data.add_(0.5 * torch.randn_like(p))
    weights = tmp_path / "teacher.pt"
    torch.save(teacher_model.state_dict(), weights)
    spec = _spec(
        "token_encoder",
        "token_dicts",
        model={"kwargs": {"classify": False}},
        baseline={"epochs": 0, "weights": str(weights)},
        task="distillation",
        distillation={"loss": "mse"},
    )
    state = {k: v.numpy() for k, v in teacher_model.state_dict().items()}
    data, metrics = compress(spec, _policy(spec, bits=4), state, CPU, seed=0)
    header = ckpt.decode(data, model=held.token_encoder(classify=False)).meta
    assert header["teacher"] == {"loss": "mse", "source": "baseline.weights"}
    path = tmp_path / "student.sparq"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="--teacher FILE"):
        evaluate_checkpoint(path, ("tests",))
    out = evaluate_checkpoint(path, ("tests",), teacher_weights=weights)
    assert out["cosine"] == pytest.approx(metrics["cosine"], abs=1e-6)
    # the model as its spec builds it is another teacher: another cosine
    builtin = tmp_path / "spec_model.pt"
    torch.save(held.token_encoder(classify=False).state_dict(), builtin)
    other = evaluate_checkpoint(path, ("tests",), teacher_weights=builtin)
    assert abs(other["cosine"] - metrics["cosine"]) > 1e-3
