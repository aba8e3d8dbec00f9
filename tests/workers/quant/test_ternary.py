"""Ternary weights: what the generic contract (test_contract.py) does not check."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from search_spaces import LayerPolicy, Policy, policy_from_params, to_optuna
from service.spec import JobSpec, ModelSpec
from workers.compress import quant
from workers.compress.engine import compressible_layers
from workers.compress.quant.ternary import TernaryWeight
from workers.jobs import checkpoint as ckpt
from workers.zoo.models import digits_mlp


def test_each_channel_is_minus_a_zero_plus_a_with_the_threshold() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    pm = TernaryWeight(w, threshold=0.7).eval()
    q = pm(w)
    for row, qrow in zip(w, q, strict=True):
        a = qrow.abs().max()
        assert set(qrow.unique().tolist()) <= {-float(a), 0.0, float(a)}
        kept = row.abs() > 0.7 * row.abs().mean()
        assert torch.equal(qrow != 0, kept)
        assert torch.equal(torch.sign(qrow[kept]), torch.sign(row[kept]))
        assert abs(float(a) - float(row.abs()[kept].mean())) < 1e-3  # fp16 of the mean
    assert pm.weight_bits() == 2.0


def test_a_higher_threshold_zeroes_more() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    low = (TernaryWeight(w, threshold=0.3).eval()(w) == 0).sum()
    high = (TernaryWeight(w, threshold=1.2).eval()(w) == 0).sum()
    assert low < high


def test_the_checkpoint_stores_2_bit_codes_with_fp16_scales() -> None:
    torch.manual_seed(0)
    model = digits_mlp(hidden=32)
    layers = {i.name: LayerPolicy(bits=2, sparsity=0.0) for i in compressible_layers(model)}
    policy = Policy(layers=layers, method={"name": "ternary", "threshold": 0.7})
    quant.apply(model, policy).eval()
    data = ckpt.encode(
        model, model_spec=ModelSpec(builtin="digits-mlp", kwargs={"hidden": 32}), policy=policy
    )
    header, _ = ckpt.read_header(data)
    rows = [r for r in header["tensors"] if r[0].endswith("weight")]
    assert {r[2] for r in rows} <= {"q", "qs", "qsr", "qe", "qsre"}
    assert all(r[3] == 2 for r in rows)
    n = sum(p.numel() for p in model.parameters() if p.dim() > 1)
    assert len(data) < n / 4 + 4096  # about 2 bits a weight, plus biases and the header
    assert quant.count_bops(model, torch.rand(1, 1, 8, 8)).relative < 2 * 32 / (32 * 32) + 1e-9


def test_the_threshold_is_searched_from_the_preset_and_refused_out_of_range() -> None:
    spec = JobSpec.model_validate(
        {
            "model": {"builtin": "digits-mlp"},
            "dataset": {"builtin": "digits"},
            "search_space": {"preset": "ternary"},
        }
    )
    space = spec.search_space.knob_space([{"name": "1", "kind": "linear", "numel": 64}])
    dist = to_optuna(space)["ternary_threshold"]
    assert list(dist.choices) == [0.5, 0.7, 0.9]  # type: ignore[attr-defined]
    policy = policy_from_params(
        space, {"1.bits": 2, "1.sparsity": 0.0, "noise_rate": 1.0, "ternary_threshold": 0.9}
    )
    assert policy.method.summary() == {"ternary_threshold": "0.9"}
    with pytest.raises(ValidationError, match=r"thresholds must lie in \(0, 1.5\]"):
        JobSpec.model_validate(
            {
                "model": {"builtin": "digits-mlp"},
                "dataset": {"builtin": "digits"},
                "search_space": {
                    "method": "ternary",
                    "method_knobs": {"ternary": {"thresholds": [2]}},
                },
            }
        )
