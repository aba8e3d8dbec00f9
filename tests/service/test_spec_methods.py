"""The job spec's method knobs: defaults, searchable lists, and clear refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.spec import JobSpec

BASE = {"model": {"builtin": "digits-cnn"}, "dataset": {"builtin": "digits"}}


def _spec(**ss: object) -> JobSpec:
    return JobSpec.model_validate({**BASE, "search_space": ss})


def test_the_default_method_is_quant_noise() -> None:
    ss = JobSpec.model_validate(BASE).search_space
    assert ss.methods == ["quant_noise"]
    assert ss.activation.bits == [32]


def test_methods_may_be_a_list_to_search() -> None:
    assert _spec(method=["ipq", "geta"]).search_space.methods == ["ipq", "geta"]


def test_an_unknown_method_is_refused_with_the_choices() -> None:
    with pytest.raises(ValidationError, match=r"quant_noise.*ipq.*mx.*bfp.*geta"):
        _spec(method="awq")


def test_mx_float_elements_need_4_6_or_8_bits() -> None:
    with pytest.raises(
        ValidationError, match=r"MX float elements exist for 4, 6 and 8 .* \[2, 3\]"
    ):
        _spec(method="mx", mx_element=["fp"], weight_bits=[2, 3, 4])
    assert _spec(method="mx", mx_element=["fp"], weight_bits=[4, 8])


def test_geta_bit_range_must_be_ordered() -> None:
    with pytest.raises(
        ValidationError, match=r"`bit_low <= bit_high` must hold.*bit_low=6, bit_high=4"
    ):
        _spec(method="geta", geta={"bit_low": 6, "bit_high": 4})


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("activation", {"bits": [1]}, r"activation bits must be in 2..8 or 32"),
        ("ipq", {"centroids": [512]}, r"centroid count must be in 2..256"),
        ("geta_group_sparsity", {"low": 0.2, "high": 1.0}, r"geta_group_sparsity must lie in"),
    ],
)
def test_bad_knobs_name_the_rule(field: str, value: object, rule: str) -> None:
    with pytest.raises(ValidationError, match=rule):
        _spec(**{field: value})
