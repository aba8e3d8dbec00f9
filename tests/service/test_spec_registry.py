"""The spec's method cross-checks come from the method registry
(``search_spaces.methods``): every registered method is a valid ``method``, and an
export format a method cannot write is refused at submit, as ``export.formats``."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from search_spaces.methods import FORMATS, METHODS
from service.api import create_app
from service.settings import Settings
from service.spec import JobSpec

BASE = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}
CASES = [(m, f) for m in METHODS for f in FORMATS]


def _spec(method: str | list[str], formats: list[str]) -> JobSpec:
    ss = {"method": method}
    return JobSpec.model_validate({**BASE, "search_space": ss, "export": {"formats": formats}})


@pytest.mark.parametrize(("method", "fmt"), CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_a_format_is_accepted_exactly_when_the_method_writes_it(method: str, fmt: str) -> None:
    formats = sorted({"sparq", fmt})
    if fmt in METHODS[method].export_formats:
        assert _spec(method, formats).export.formats == formats
        return
    with pytest.raises(ValidationError) as info:
        _spec(method, formats)
    (err,) = info.value.errors()
    assert err["loc"] == ("export", "formats")
    assert err["input"] == formats
    assert repr(fmt) in err["msg"]
    assert method in err["msg"]


def test_every_format_but_sparq_is_refused_by_some_method_or_none() -> None:
    """The rule is not vacuous: sparq is written by all, onnx only by some."""
    assert all("sparq" in cls.export_formats for cls in METHODS.values())
    onnx = [m for m, cls in METHODS.items() if "onnx" in cls.export_formats]
    assert "quant_noise" in onnx
    assert "ipq" not in onnx


def test_one_method_in_a_searched_list_that_cannot_write_onnx_refuses_the_spec() -> None:
    with pytest.raises(ValidationError, match=r"\['ipq'\]"):
        _spec(["quant_noise", "ipq"], ["sparq", "onnx"])


def test_the_api_answers_422_naming_field_value_and_rule(settings: Settings) -> None:
    body = {**BASE, "search_space": {"method": "ipq"}, "export": {"formats": ["sparq", "onnx"]}}
    with TestClient(create_app(settings, launch=False), raise_server_exceptions=False) as c:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 422
        (detail,) = r.json()["detail"]
        assert detail["field"] == "export.formats"
        assert detail["value"] == ["sparq", "onnx"]
        assert "'onnx' cannot be written by method(s) ['ipq']" in detail["rule"]
        assert c.get("/v1/jobs").json()["jobs"] == []


def test_method_knobs_must_name_registered_methods_and_their_own_knobs() -> None:
    with pytest.raises(ValidationError, match=r"method_knobs names methods \['awq'\]"):
        JobSpec.model_validate({**BASE, "search_space": {"method_knobs": {"awq": {}}}})
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({**BASE, "search_space": {"method_knobs": {"ipq": {"nope": 1}}}})
    (err,) = info.value.errors()
    assert err["loc"] == ("search_space", "method_knobs", "ipq", "nope")
    assert err["input"] == 1
    ss = JobSpec.model_validate({**BASE, "search_space": {"method_knobs": {"ipq": {}}}})
    space = ss.search_space.knob_space([{"name": "1", "kind": "linear", "numel": 64}])
    assert space.method_knobs == {"ipq": {}}
