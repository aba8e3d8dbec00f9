"""Search-space presets (search_spaces/presets/*.yaml) and the job spec's
``search_space.preset`` / ``search_space.coarsen``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from pydantic import ValidationError

from search_spaces import LayerInfo, load_preset, merge_preset, policy_from_params, preset_names
from search_spaces import to_optuna as _to_optuna
from search_spaces._presets import MERGED_KNOBS
from search_spaces.methods import METHODS
from service.api import validation_details
from service.spec import JobSpec, SearchSpaceSpec

# the shipped presets (a method's module comes with one); these must stay
CORE = ["geta", "ipq", "joint", "mixed_precision", "quant_noise", "sparsity"]
PRESETS = list(preset_names())
LAYERS = [
    LayerInfo(name="0", kind="conv2d", numel=144, sparsity_kinds=["unstructured"]).model_dump(),
    LayerInfo(
        name="1.a", kind="conv2d", numel=2304, sparsity_kinds=["unstructured", "2:4", "1:4"]
    ).model_dump(),
    LayerInfo(
        name="1.b", kind="conv2d", numel=2304, sparsity_kinds=["unstructured", "2:4", "1:4"]
    ).model_dump(),
    LayerInfo(
        name="fc", kind="linear", numel=320, sparsity_kinds=["unstructured", "2:4"]
    ).model_dump(),
]
GROUPS = [
    {"name": "0", "channels": 16, "layers": ["0", "1.b"]},
    {"name": "1.a", "channels": 16, "layers": ["1.a"]},
]


def _job(**search_space: Any) -> dict[str, Any]:
    return {
        "model": {"builtin": "digits-cnn"},
        "dataset": {"builtin": "digits"},
        "search_space": search_space,
    }


def test_every_registered_method_has_a_preset() -> None:
    """A method comes with its preset (mx and bfp predate the rule: they are searched
    by naming them in `method`)."""
    methods = {load_preset(name).get("method", "quant_noise") for name in PRESETS}
    assert set(METHODS) - {"mx", "bfp"} <= methods


def test_the_shipped_presets() -> None:
    assert set(CORE) <= set(PRESETS)
    shipped = Path(__file__).resolve().parents[2] / "search_spaces" / "presets"
    assert sorted(p.stem for p in shipped.glob("*.yaml")) == PRESETS
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'search_spaces = ["presets/*.yaml"]' in pyproject  # shipped as package data
    for name in PRESETS:
        text = (shipped / f"{name}.yaml").read_text()
        assert text.startswith(f"# {name}:"), "each preset opens with what it searches"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates_and_samples(name: str) -> None:
    preset = load_preset(name)
    ss = SearchSpaceSpec(preset=name)
    dumped = ss.model_dump(mode="json")
    for key, value in preset.items():  # the preset's values are the spec's
        if isinstance(value, dict) and key in MERGED_KNOBS:
            assert value.items() <= dumped[key].items(), key
        else:
            assert dumped[key] == value, key
    space = ss.knob_space(LAYERS, GROUPS)
    dists = _to_optuna(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        policy = policy_from_params(space, study.ask(dists).params)
        assert policy.method.name == ss.methods[0]
        assert policy.layers["0"] == policy.layers["1.b"]  # coupled: one knob (coarsen group)


def test_joint_is_todays_defaults() -> None:
    joint = load_preset("joint")
    for key, value in joint.items():
        default = SearchSpaceSpec.model_fields[key].get_default(call_default_factory=True)
        dumped = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
        assert dumped == value, key
    assert SearchSpaceSpec() == SearchSpaceSpec(preset="joint")
    assert SearchSpaceSpec().coarsen == "group"


def test_what_each_preset_searches() -> None:
    def searched(name: str) -> set[str]:
        dists = _to_optuna(SearchSpaceSpec(preset=name).knob_space(LAYERS, GROUPS))
        return {k for k, d in dists.items() if not (hasattr(d, "choices") and len(d.choices) == 1)}

    assert searched("mixed_precision") == {"group:0.bits", "1.a.bits", "fc.bits"}
    sparsity = searched("sparsity")
    assert not any(k.endswith(".bits") for k in sparsity)
    assert {"1.a.kind", "1.a.sparsity", "group:0.channels", "group:1.a.channels"} <= sparsity
    assert {"noise_rate", "granularity", "symmetric"} <= searched("quant_noise")
    assert {"ipq_block", "ipq_centroids", "noise_rate"} == searched("ipq")
    assert {"geta_sparsity", "group:0.channels", "group:1.a.channels"} == searched("geta")


def test_written_knobs_override_the_preset_knob_by_knob() -> None:
    ss = SearchSpaceSpec.model_validate(
        {
            "preset": "ipq",
            "ipq": {"centroids": [32]},  # nested: merged key by key
            "noise_rate": {"low": 0.2, "high": 0.3},  # a range: replaced whole
            "weight_bits": [4, 8],  # a list: replaced whole
        }
    )
    assert ss.method == "ipq"
    assert ss.ipq.block_sizes == [4, 8]  # the preset's
    assert ss.ipq.centroids == [32]
    assert (ss.noise_rate.low, ss.noise_rate.high) == (0.2, 0.3)
    assert ss.weight_bits == [4, 8]
    assert (ss.sparsity.low, ss.sparsity.high) == (0.0, 0.0)  # the preset's
    geta = SearchSpaceSpec.model_validate({"preset": "geta", "geta": {"lr": 0.01}})
    assert (geta.geta.lr, geta.geta.bit_low, geta.geta.bit_high) == (0.01, 4, 8)
    assert geta.geta_group_sparsity is not None
    assert geta.geta_group_sparsity.high == 0.5
    off = SearchSpaceSpec.model_validate({"preset": "geta", "geta_group_sparsity": None})
    assert off.geta_group_sparsity is None
    assert merge_preset({"a": [1, 2], "ipq": {"x": 1}}, {"a": [3], "ipq": {"y": 2}}) == {
        "a": [3],
        "ipq": {"x": 1, "y": 2},
    }


@pytest.mark.parametrize("name", PRESETS)
def test_the_dump_round_trips(name: str) -> None:
    spec = JobSpec.model_validate(
        _job(
            preset=name,
            coarsen="block",
            sparsity={"low": 0.0, "high": 0.5},
            ipq={"centroids": [8]},
        )
    )
    assert JobSpec.model_validate(spec.model_dump()) == spec
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert JobSpec.from_yaml(spec.to_yaml()) == spec
    assert spec.search_space.preset == name
    assert (spec.search_space.sparsity.low, spec.search_space.sparsity.high) == (0.0, 0.5)
    assert yaml.safe_load(spec.to_yaml())["search_space"]["coarsen"] == "block"


def test_unknown_preset_names_the_field_value_and_presets() -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(_job(preset="qat", weight_bits=[4]))
    (detail,) = validation_details(info.value.errors())
    assert detail["field"] == "search_space.preset"
    assert detail["value"] == "qat"
    assert detail["rule"] == f"preset 'qat' is not known; choose one of {PRESETS}"
    with pytest.raises(ValueError, match=r"preset 'qat' is not known; choose one of \['geta'"):
        load_preset("qat")


def test_bad_coarsen_names_the_field_value_and_levels() -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(_job(coarsen="blocks"))
    (detail,) = validation_details(info.value.errors())
    assert detail["field"] == "search_space.coarsen"
    assert detail["value"] == "blocks"
    assert detail["rule"] == "Input should be 'layer', 'group', 'block' or 'type'"


def test_a_bad_knob_under_a_preset_still_names_the_knob() -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(_job(preset="sparsity", weight_bits=[9]))
    (detail,) = validation_details(info.value.errors())
    assert detail["field"] == "search_space.weight_bits"
    assert "must be in 2..8" in detail["rule"]
