"""Files written by main d42f6dc, before methods were config classes, still load.

``fixtures/main_*`` were written by ``fixtures/make_main_fixtures.py.txt`` (kept as
text: it runs only on that commit) with that commit's code (flat policies: ``method``
a string, every method's knobs top-level):
one checkpoint per method with its eval outputs, the policies as MLflow params,
``policy.json`` / job-store rows and checkpoint headers, and a saved ``KnobSpace``
with the policies its sampled parameters stood for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from search_spaces import KnobSpace, Policy, policy_from_params, to_optuna
from workers.jobs import checkpoint as ckpt

FIXTURES = Path(__file__).parent / "fixtures"
METHODS = ["quant_noise", "ipq", "mx", "bfp", "geta"]
POLICIES: dict[str, Any] = json.loads((FIXTURES / "main_policies.json").read_text())


def _x() -> torch.Tensor:
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_of_main_loads_with_identical_outputs(method: str) -> None:
    data = (FIXTURES / f"main_{method}.sparq").read_bytes()
    back = ckpt.decode(data)
    with torch.no_grad():
        out = back.model(_x())
    # The fixture's outputs were computed on another CPU: its matmul kernels sum in
    # another order (differences of ~3e-8 here), so equal up to float32 rounding.
    want = torch.from_numpy(np.load(FIXTURES / f"main_{method}.out.npy"))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    assert back.policy is not None
    assert back.policy.summary() == POLICIES[method]["summary"]
    assert ckpt.size_report(data) == POLICIES[method]["size"]


@pytest.mark.parametrize("method", METHODS)
def test_flat_policies_of_main_validate_to_the_same_policy(method: str) -> None:
    """A ``policy.json`` / job-store row (every field) and a checkpoint header
    (defaults left out) of main give one policy, with main's MLflow params."""
    full = Policy.model_validate(POLICIES[method]["dump"])
    assert full == Policy.model_validate(POLICIES[method]["header"])
    assert full.summary() == POLICIES[method]["summary"]
    assert Policy.model_validate(full.model_dump(mode="json")) == full


def test_a_knob_space_of_main_samples_the_same_policies() -> None:
    saved = json.loads((FIXTURES / "main_knob_space.json").read_text())
    space = KnobSpace.model_validate(saved["space"])
    assert {k: repr(v) for k, v in to_optuna(space).items()} == saved["optuna"]
    for method, want in saved["policies"].items():
        got = policy_from_params(space, {**saved["params"], "method": method})
        assert got == Policy.model_validate(want)
    assert KnobSpace.model_validate(space.model_dump(mode="json")) == space


def test_a_bad_flat_field_is_a_validation_error_naming_it() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="geta"):
        Policy.model_validate({"layers": {}, "method": "geta", "geta": 5})
    with pytest.raises(ValidationError, match="block"):
        Policy.model_validate({"layers": {}, "method": "ipq", "ipq_block": 0})
    # another method's flat knobs are inert in a flat policy, as they were
    assert Policy.model_validate({"layers": {}, "ipq_block": 8}).method.name == "quant_noise"
