from __future__ import annotations

import optuna
import pytest
from pydantic import ValidationError

from search_spaces import KnobSpace, LayerInfo, LayerPolicy, Policy, policy_from_params, to_optuna


def _space(**kw: object) -> KnobSpace:
    base = {
        "layers": [
            LayerInfo(name="0", kind="linear", numel=64),
            LayerInfo(name="2", kind="conv2d", numel=9),
        ],
        "weight_bits": [2, 4, 8],
        "sparsity_low": 0.0,
        "sparsity_high": 0.9,
        "noise_rate_low": 0.1,
        "noise_rate_high": 1.0,
        "noise_block": 4,
    }
    return KnobSpace.model_validate({**base, **kw})


def test_json_round_trip() -> None:
    space = _space()
    assert KnobSpace.model_validate_json(space.model_dump_json()) == space


def test_optuna_sampling_gives_valid_policies() -> None:
    space = _space()
    dists = to_optuna(space)
    assert set(dists) == {"0.bits", "0.sparsity", "2.bits", "2.sparsity", "noise_rate"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask(dists)
        policy = policy_from_params(space, trial.params)
        assert isinstance(policy, Policy)
        assert all(lp.bits in (2, 4, 8) for lp in policy.layers.values())
        assert all(0.0 <= lp.sparsity <= 0.9 for lp in policy.layers.values())
        assert 0.1 <= policy.noise_rate <= 1.0
        study.tell(trial, 0.0)


def test_fixed_knobs_become_single_choices() -> None:
    dists = to_optuna(_space(sparsity_low=0.5, sparsity_high=0.5))
    assert isinstance(dists["0.sparsity"], optuna.distributions.CategoricalDistribution)
    assert dists["0.sparsity"].choices == (0.5,)


def test_invalid_spaces_name_the_rule() -> None:
    with pytest.raises(ValidationError, match=r"sparsity_low <= sparsity_high"):
        _space(sparsity_low=0.8, sparsity_high=0.2)
    with pytest.raises(ValidationError, match="no compressible layer"):
        _space(layers=[])


def test_policy_summary_is_flat_strings() -> None:
    policy = policy_from_params(
        _space(),
        {"0.bits": 2, "0.sparsity": 0.5, "2.bits": 8, "2.sparsity": 0.0, "noise_rate": 0.3},
    )
    summary = policy.summary()
    assert summary["0.bits"] == "2"
    assert summary["noise_rate"] == "0.3"
    assert all(isinstance(v, str) for v in summary.values())


def test_sparsity_kinds_and_channel_groups_become_knobs() -> None:
    from search_spaces import GroupInfo

    space = _space(
        layers=[
            LayerInfo(name="0", kind="linear", numel=64, sparsity_kinds=["unstructured", "2:4"]),
            LayerInfo(name="2", kind="conv2d", numel=9),
        ],
        sparsity_kinds=["unstructured", "2:4", "1:4", "channel"],
        groups=[GroupInfo(name="0", channels=8, layers=["0"])],
        channel_low=0.1,
        channel_high=0.5,
    )
    dists = to_optuna(space)
    assert set(dists) == {
        "0.bits", "0.kind", "0.sparsity", "2.bits", "2.sparsity", "group:0.channels",
        "noise_rate",
    }  # fmt: skip
    assert list(dists["0.kind"].choices) == ["unstructured", "2:4"]  # type: ignore[attr-defined]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    kinds = set()
    for _ in range(30):
        policy = policy_from_params(space, study.ask(dists).params)
        kinds.add(policy.layers["0"].kind)
        assert policy.layers["2"].kind == "unstructured"
        assert 0.1 <= policy.channels["0"] <= 0.5
        if policy.layers["0"].kind == "2:4":
            assert policy.layers["0"].sparsity == 0.5
    assert kinds == {"unstructured", "2:4"}


def test_only_nm_kinds_leave_unsupported_layers_dense() -> None:
    space = _space(sparsity_kinds=["2:4"])
    dists = to_optuna(space)
    assert "0.sparsity" not in dists
    assert "0.kind" not in dists
    params = {"0.bits": 4, "2.bits": 4, "noise_rate": 0.5}
    policy = policy_from_params(space, params)
    assert policy.layers["0"] == LayerPolicy(bits=4, sparsity=0.0)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValidationError, match="not known"):
        _space(sparsity_kinds=["3:8"])
