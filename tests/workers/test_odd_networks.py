"""Never fail on a network (issue 14, item 1): weights tied between an embedding and
an LM head, layers called through ``torch.nn.functional`` on bare parameters, a custom
module with its own weight, and a network torch-pruning's trace cannot follow. Each is
described with what sparq cannot compress and why (``layers_left_dense``,
``layers_adjusted``), runs as trials of the default space with channel pruning, and
reloads to what its trial reported; a tied weight is compressed once and stored once."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
import torch

from search_spaces import policy_from_params, to_optuna
from service.spec import JobSpec
from workers.compress import batch as B
from workers.jobs import checkpoint as ckpt
from workers.jobs.baseline import describe_model, evaluate_bytes, knob_space, train_baseline
from workers.jobs.trial import compress
from workers.zoo.data import build_datasets

CPU = torch.device("cpu")
TEXT = {"builtin": "python-text", "kwargs": {"max_chars": 6000, "context": 16}}


def _spec(name: str) -> JobSpec:
    lm = name == "tied_lm"
    return JobSpec.model_validate(
        {
            "model": {"entrypoint": f"tests.odd_nets:{name}"},
            "dataset": TEXT if lm else {"builtin": "digits"},
            "task": "language_modeling" if lm else "classification",
            "baseline": {"epochs": 3, "lr": 0.01 if lm else 0.003},
            "search_space": {
                "finetune_epochs": 1,
                "sparsity_kinds": ["unstructured", "channel"],
                "channel_sparsity": {"low": 0.25, "high": 0.5},
            },
        }
    )


def _trials(spec: JobSpec, n: int = 2) -> list[tuple[bytes, dict[str, Any], torch.nn.Module]]:
    """``n`` trials of the default space: checkpoint, metrics, and the trained model."""
    model = describe_model(spec)
    base = train_baseline(spec.model_dump(mode="json"))
    space = knob_space(spec, model)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        policy = policy_from_params(space, study.ask(to_optuna(space)).params)
        held: dict[str, torch.nn.Module] = {}

        def keep(m: torch.nn.Module, _enc: Any, held: dict[str, Any] = held) -> None:
            held["m"] = m

        data, metrics = compress(spec, policy, base.state, CPU, seed=0, on_model=keep)
        assert metrics["size_bytes"] == len(data) < base.size_bytes
        again = evaluate_bytes(data, spec, CPU)
        assert again.accuracy == metrics["accuracy"]
        assert again.loss == metrics["loss"]
        out.append((data, metrics, held["m"]))
    return out


def _same_outputs(data: bytes, trained: torch.nn.Module, spec: JobSpec) -> None:
    """The decoded checkpoint computes what the trial's model computed."""
    from workers.jobs.baseline import job_model

    decoded = ckpt.decode(data, model=job_model(spec)).model.eval()
    _, val = build_datasets(spec.dataset)
    x = B.first_n(val, 16)
    with torch.no_grad():
        assert torch.equal(B.forward(decoded, x), B.forward(trained.eval(), x))


def test_a_tied_head_is_compressed_with_its_embedding_and_stored_once() -> None:
    spec = _spec("tied_lm")
    model = describe_model(spec)
    assert [layer["name"] for layer in model.layers] == ["tok", "mix"]  # no knob for head
    assert "tied" in model.adjusted["head"]
    assert "tok" in model.adjusted["head"]
    for data, _, trained in _trials(spec):
        header, _ = ckpt.read_header(data)
        assert header["tied"] == {"head.weight": "tok.weight"}
        assert [r[0] for r in header["tensors"]].count("tok.weight") == 1
        assert "head.weight" not in [r[0] for r in header["tensors"]]
        # the head reads the embedding's compressed weight, in training and in the file
        trained.eval()  # every block quantized (training draws noise per call)
        assert torch.equal(trained.head.weight, trained.tok.weight)
        _same_outputs(data, trained, spec)


def test_the_float_checkpoint_of_a_tied_model_stores_the_weight_once() -> None:
    from tests.odd_nets import tied_lm

    spec = _spec("tied_lm")
    model = tied_lm()
    data = ckpt.encode(model, model_spec=spec.model)
    untied = tied_lm()
    untied.head.weight = torch.nn.Parameter(model.tok.weight.detach().clone())
    saved = len(ckpt.encode(untied, model_spec=spec.model)) - len(data)
    assert saved > 128 * 32 * 4 - 64  # the float32 copy, less a header line naming the tie
    back = ckpt.decode(data, model=tied_lm()).model
    assert torch.equal(back.head.weight, model.tok.weight)


def test_a_checkpoint_naming_a_tie_to_nothing_is_refused() -> None:
    import json
    import zlib

    from tests.odd_nets import tied_lm
    from workers.errors import CheckpointError

    spec = _spec("tied_lm")
    data = ckpt.encode(tied_lm(), model_spec=spec.model)
    header, end = ckpt.read_header(data)
    header["tied"] = {"head.weight": "nowhere.weight"}
    packed = zlib.compress(json.dumps(header).encode())
    _, version, _ = ckpt._PREFIX.unpack_from(data)
    bad = ckpt._PREFIX.pack(ckpt.MAGIC, version, len(packed)) + packed + data[end:]
    with pytest.raises(CheckpointError, match="must name a stored tensor"):
        ckpt.decode(bad, model=tied_lm())


@pytest.mark.parametrize(
    ("name", "kept_float"),
    [("functional_net", "w1"), ("custom_net", "custom.weight"), ("untraceable_net", None)],
)
def test_functional_custom_and_untraceable_networks_end_in_trials(
    name: str, kept_float: str | None
) -> None:
    spec = _spec(name)
    model = describe_model(spec)
    dense = model.left_dense
    assert all(why for why in dense.values())
    if kept_float:  # a weight outside nn.Linear/Conv2d/Embedding: float, said so
        assert "kept float32" in dense[kept_float]
    if name == "untraceable_net":  # the trace stops at numpy: `a` is no node of it
        assert "not a node of the traced graph" in dense["a"]
    for data, _, trained in _trials(spec):
        _same_outputs(data, trained, spec)
