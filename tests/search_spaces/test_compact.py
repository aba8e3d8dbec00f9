"""The checkpoint header's policy (``Policy.compact_json``) validates back to the very
policy, for every registered method, and is never larger than the nested form."""

from __future__ import annotations

import json

import pytest

from search_spaces import LayerPolicy, Policy
from search_spaces.methods import METHODS

LAYERS = {"fc1": LayerPolicy(bits=4, sparsity=0.5), "fc2": LayerPolicy(bits=32, sparsity=0.0)}
FLAT = [
    {"method": "quant_noise", "granularity": "tensor", "symmetric": False},
    {"method": "ipq", "ipq_block": 8, "ipq_centroids": 32},
    {"method": "mx", "mx_element": "fp", "order": "qs"},
    {"method": "bfp", "order": "qs"},
    {"method": "geta", "geta": {"bit_low": 3, "target_group_sparsity": 0.5}},
]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_methods_default_policy_round_trips(name: str) -> None:
    policy = Policy(layers=LAYERS, method=METHODS[name](), noise_rate=0.5)
    compact = policy.compact_json()
    assert Policy.model_validate(compact) == policy
    nested = policy.model_dump(mode="json", exclude_defaults=True)
    assert len(json.dumps(compact)) <= len(json.dumps(nested))


@pytest.mark.parametrize("flat", FLAT, ids=[f["method"] for f in FLAT])
def test_knobs_set_away_from_their_defaults_round_trip_flat(flat: dict[str, object]) -> None:
    policy = Policy.model_validate({"layers": LAYERS, **flat})
    compact = policy.compact_json()
    assert Policy.model_validate(compact) == policy
    assert not isinstance(compact.get("method", ""), dict)  # written as sparq wrote it then
