from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.spec import JobSpec

MINIMAL = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}


def _err(data: dict) -> str:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    return str(info.value)


def test_minimal_spec_gets_the_joint_search_defaults() -> None:
    spec = JobSpec.model_validate(MINIMAL)
    assert spec.task == "classification"
    assert spec.objectives == ["accuracy", "size_bytes"]
    assert spec.search_space.weight_bits == [2, 3, 4, 5, 6, 8]
    assert spec.search_space.sparsity.high > 0
    assert spec.export.choose == "knee"
    assert spec.search.trials >= 1
    assert spec.search.concurrency >= 1


def test_yaml_and_json_round_trip() -> None:
    spec = JobSpec.model_validate(
        {**MINIMAL, "search": {"trials": 5, "concurrency": 1, "seed": 3}, "name": "x-1"}
    )
    assert JobSpec.from_yaml(spec.to_yaml()) == spec
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize(
    ("patch", "field", "rule"),
    [
        ({"search": {"trials": 0}}, "search.trials", "greater than or equal to 1"),
        ({"search": {"concurrency": -1}}, "search.concurrency", "greater than or equal to 1"),
        ({"model": {"builtin": "resnet9000"}}, "model.builtin", "not known"),
        ({"model": {"builtin": "digits-mlp", "entrypoint": "a:b"}}, "model", "exactly one"),
        ({"model": {"entrypoint": "no_colon"}}, "model.entrypoint", "module:function"),
        ({"search_space": {"weight_bits": [1, 4]}}, "search_space.weight_bits", "2..8"),
        ({"search_space": {"weight_bits": []}}, "search_space.weight_bits", "at least one"),
        ({"search_space": {"sparsity": {"low": 0.5, "high": 0.2}}}, "sparsity", "low <= high"),
        ({"search_space": {"sparsity": {"low": 0.0, "high": 1.0}}}, "sparsity", "[0, 1)"),
        ({"resources": {"gpus": -0.5}}, "resources.gpus", "greater than or equal to 0"),
        ({"objectives": ["accuracy"]}, "objectives", "exactly"),
        ({"serch": {"trials": 3}}, "serch", "Extra inputs are not permitted"),
        ({"search": {"sampler": "bogus"}}, "search.sampler", "'nsga2', 'gp' or 'random'"),
        (
            {"search": {"early_stopping": {"reduction_factor": 1}}},
            "search.early_stopping.reduction_factor",
            "greater than or equal to 2",
        ),
    ],
)
def test_invalid_specs_name_field_and_rule(patch: dict, field: str, rule: str) -> None:
    message = _err({**MINIMAL, **patch})
    assert field in message
    assert rule in message


def test_spec_requires_model_and_dataset() -> None:
    message = _err({"model": {"builtin": "digits-mlp"}})
    assert "dataset" in message
    assert "Field required" in message


def test_yaml_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ValueError, match="must be a mapping"):
        JobSpec.from_yaml("- a\n- b\n")


@pytest.mark.parametrize(
    ("patch", "field", "rule"),
    [
        ({"search_space": {"sparsity_kinds": ["3:4"]}}, "search_space.sparsity_kinds", "2:4"),
        ({"search_space": {"sparsity_kinds": []}}, "sparsity_kinds", "at least one"),
        ({"search_space": {"sparsity_kinds": ["channel", "channel"]}}, "sparsity_kinds", "repeat"),
        ({"search_space": {"channel_sparsity": {"low": 0, "high": 1}}}, "channel", "[0, 1)"),
        ({"export": {"formats": ["onnx"]}}, "export.formats", "must include 'sparq'"),
        ({"export": {"formats": ["tflite"]}}, "export.formats", "'sparq' or 'onnx'"),
        ({"task": "language_modeling", "objectives": ["accuracy", "size_bytes"]}, "objectives",
         "['perplexity', 'size_bytes']"),
    ],
)  # fmt: skip
def test_issue4_fields_name_field_and_rule(patch: dict, field: str, rule: str) -> None:
    message = _err({**MINIMAL, **patch})
    assert field in message
    assert rule in message


def test_issue4_fields_round_trip() -> None:
    spec = JobSpec.model_validate(
        {**MINIMAL, "model": {"entrypoint": "tests.nets:residual_cnn"},
         "search_space": {"sparsity_kinds": ["unstructured", "2:4", "channel"],
                          "channel_sparsity": {"low": 0.1, "high": 0.4}},
         "export": {"formats": ["sparq", "onnx"]}}
    )  # fmt: skip
    assert JobSpec.from_yaml(spec.to_yaml()) == spec
    assert spec.search_space.sparsity_kinds == ["unstructured", "2:4", "channel"]
