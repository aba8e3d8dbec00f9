"""Knob tying (``coarsen``) on real layer and group lists: the builtin models and the
networks of tests/nets.py, analysed by torch-pruning's dependency graph."""

from __future__ import annotations

import functools
import json

import optuna
import pytest
from pydantic import ValidationError

from search_spaces import (
    GroupInfo,
    KnobSpace,
    LayerInfo,
    knob_layers,
    policy_from_params,
    tie_layers,
    to_optuna,
)
from service.spec import SearchSpaceSpec

NETS = [
    "digits-mlp",
    "digits-cnn",
    "digits-dsconv",
    "digits-transformer",
    "tests.nets:residual_cnn",
    "tests.nets:concat_cnn",
    "tests.nets:se_cnn",
    "tests.nets:dsconv_net",
    "tests.nets:tiny_transformer",
]
LEVELS = ["layer", "group", "block", "type"]


@functools.cache
def _model(label: str) -> tuple[tuple[LayerInfo, ...], tuple[GroupInfo, ...]]:
    import torch

    from service.spec import ModelSpec
    from workers.compress.engine import compressible_layers
    from workers.compress.pruning import analyze
    from workers.zoo.models import build_model

    spec = ModelSpec(entrypoint=label) if ":" in label else ModelSpec(builtin=label)
    torch.manual_seed(0)
    model = build_model(spec)
    report = analyze(model, torch.rand(1, 1, 8, 8)).as_dict()
    groups = tuple(GroupInfo.model_validate(g) for g in report["groups"])
    return tuple(compressible_layers(model)), groups


def _space(label: str, coarsen: str, **knobs: object) -> KnobSpace:
    layers, groups = _model(label)
    ss = SearchSpaceSpec.model_validate({"coarsen": coarsen, **knobs})
    return ss.knob_space([x.model_dump() for x in layers], [g.model_dump() for g in groups])


def _counts(label: str, **knobs: object) -> dict[str, int]:
    return {lvl: len(to_optuna(_space(label, lvl, **knobs))) for lvl in LEVELS}


def test_digits_cnn_parameter_count_per_level() -> None:
    """digits-cnn: conv `0` and the residual's `3.conv2` feed one add (a dependency
    group); `3.conv1`/`3.conv2` share block `3`; four convs and one linear."""
    counts = _counts("digits-cnn")
    # (bits + sparsity) per knob, plus noise_rate
    assert counts == {"layer": 11, "group": 9, "block": 7, "type": 5}
    assert counts["layer"] > counts["group"] >= counts["block"] >= counts["type"]


@pytest.mark.parametrize("label", NETS)
def test_coarser_levels_never_add_parameters(label: str) -> None:
    counts = _counts(label, sparsity_kinds=["unstructured", "2:4", "channel"])
    assert counts["layer"] >= counts["group"] >= max(counts["block"], counts["type"])
    kinds = {x.kind for x in _model(label)[0]}
    assert len(set(_space(label, "type").ties.values())) <= len(kinds)


@pytest.mark.parametrize("label", NETS)
def test_group_ties_are_the_dependency_groups(label: str) -> None:
    layers, groups = _model(label)
    ties = _space(label, "group").ties
    coupled = {n for g in groups if len(g.layers) > 1 for n in g.layers}
    for g in groups:
        if len(g.layers) > 1:
            assert {ties[n] for n in g.layers} == {f"group:{g.name}"}
    for x in layers:
        if x.name not in coupled:
            assert ties[x.name] == x.name  # alone: today's per-layer name


def test_tie_names_per_level() -> None:
    assert _space("digits-cnn", "group").ties == {
        "0": "group:0", "3.conv1": "3.conv1", "3.conv2": "group:0", "4": "4", "9": "9",
    }  # fmt: skip
    assert _space("digits-cnn", "block").ties == {
        "0": "block:0", "3.conv1": "block:0", "3.conv2": "block:0", "4": "block:4",
        "9": "block:9",
    }  # fmt: skip
    assert _space("digits-cnn", "type").ties == {
        "0": "type:conv2d", "3.conv1": "type:conv2d", "3.conv2": "type:conv2d",
        "4": "type:conv2d", "9": "type:linear",
    }  # fmt: skip
    residual = _space("tests.nets:residual_cnn", "group").ties
    assert residual["stem"] == residual["block1.b"] == residual["block2.b"] == "group:stem"
    assert residual["block1.a"] == "block1.a"
    se = _space("tests.nets:se_cnn", "block").ties  # se1.excite is coupled to conv1
    assert se["conv1"] == se["se1.squeeze"] == se["se1.excite"] == "block:conv1"
    assert se["fc"] == "block:fc"
    # a group couples the embeddings to the residual stream's linears: one kind set
    tiny = _space("tests.nets:tiny_transformer", "type").ties
    assert set(tiny.values()) == {"type:embedding+linear"}


def test_layer_level_keeps_todays_parameter_names() -> None:
    layers, groups = _model("digits-transformer")
    space = _space("digits-transformer", "layer", sparsity_kinds=["unstructured", "2:4", "channel"])
    want: list[str] = []
    for x in layers:
        want.append(f"{x.name}.bits")
        if "2:4" in x.sparsity_kinds:
            want.append(f"{x.name}.kind")
        want.append(f"{x.name}.sparsity")
    want += [f"group:{g.name}.channels" for g in groups] + ["noise_rate"]
    assert list(to_optuna(space)) == want


@pytest.mark.parametrize("label", ["digits-cnn", "digits-transformer", "tests.nets:se_cnn"])
@pytest.mark.parametrize("coarsen", LEVELS)
def test_tied_layers_get_identical_policies(label: str, coarsen: str) -> None:
    space = _space(label, coarsen, sparsity_kinds=["unstructured", "2:4", "1:4", "channel"])
    dists = to_optuna(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(15):
        policy = policy_from_params(space, study.ask(dists).params)
        assert set(policy.layers) == {x.name for x in space.layers}
        for knob, members in knob_layers(space).items():
            got = {policy.layers[x.name] for x in members}
            assert len(got) == 1, (knob, got)
            (lp,) = got
            # a tied kind is one every tied layer supports
            assert all(lp.kind in x.sparsity_kinds for x in members)


def test_tied_kinds_are_the_intersection() -> None:
    # `0` (1 input channel) supports unstructured only, `3.conv2` also N:M
    space = _space("digits-cnn", "group", sparsity_kinds=["unstructured", "2:4"])
    dists = to_optuna(space)
    assert "group:0.kind" not in dists
    assert "group:0.sparsity" in dists
    assert list(dists["3.conv1.kind"].choices) == ["unstructured", "2:4"]  # type: ignore[attr-defined]
    # only N:M asked: the tied knob has no kind its layers all support, so both stay dense
    dense = _space("digits-cnn", "group", sparsity_kinds=["2:4"])
    dists = to_optuna(dense)
    assert "group:0.sparsity" not in dists
    assert "group:0.kind" not in dists
    params = optuna.create_study().ask(dists).params
    policy = policy_from_params(dense, params)
    assert policy.layers["0"].sparsity == policy.layers["3.conv2"].sparsity == 0.0
    assert policy.layers["3.conv1"].kind == "2:4"
    assert policy.layers["3.conv1"].sparsity == 0.5


@pytest.mark.parametrize("coarsen", LEVELS)
def test_json_round_trip(coarsen: str) -> None:
    space = _space("tests.nets:residual_cnn", coarsen, sparsity_kinds=["unstructured", "channel"])
    assert space.coarsen == coarsen
    again = KnobSpace.model_validate_json(space.model_dump_json())
    assert again == space
    assert to_optuna(again) == to_optuna(space)


def test_saved_ties_win_over_the_level() -> None:
    """A resumed job reads its search_space.json: the stored ties are used as they are,
    whatever ``tie_layers`` would derive today."""
    space = _space("digits-cnn", "type")
    data = space.model_dump(mode="json")
    data["ties"] = {**data["ties"], "9": "custom"}
    loaded = KnobSpace.model_validate(data)
    assert loaded.ties["9"] == "custom"
    assert "custom.bits" in to_optuna(loaded)


def test_old_json_without_ties_loads_per_layer() -> None:
    space = _space("digits-cnn", "group")
    old = json.loads(space.model_dump_json())
    del old["coarsen"], old["ties"]  # what a job saved before knob tying wrote
    loaded = KnobSpace.model_validate(old)
    assert loaded.coarsen == "layer"
    assert loaded.ties == {x.name: x.name for x in loaded.layers}
    assert loaded == _space("digits-cnn", "layer")


def test_bad_ties_name_the_layers() -> None:
    data = _space("digits-cnn", "group").model_dump(mode="json")
    missing = {**data, "ties": {k: v for k, v in data["ties"].items() if k != "9"}}
    with pytest.raises(ValidationError, match=r"layers \['9'\] have no knob"):
        KnobSpace.model_validate(missing)
    extra = {**data, "ties": {**data["ties"], "nope": "x"}}
    with pytest.raises(ValidationError, match=r"\['nope'\] are not layers of the model"):
        KnobSpace.model_validate(extra)
    with pytest.raises(ValidationError, match="coarsen"):
        KnobSpace.model_validate({**data, "ties": {}, "coarsen": "blocks"})


def test_tie_layers_refuses_an_unknown_level() -> None:
    layers, groups = _model("digits-mlp")
    with pytest.raises(ValueError, match=r"coarsen must be one of \['layer', 'group'"):
        tie_layers("model", layers, groups)
