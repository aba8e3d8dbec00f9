"""transformers' ``Conv1D`` (GPT-2's attention and MLP layers, weight stored
``[in, out]``) is compressed as the ``nn.Linear`` it is: the model a spec builds has
``FromConv1D`` Linears computing the same function, the engine addresses them, the
job says so, a checkpoint reloads them and a state dict written by the original model
warm-starts the job (transposed on loading). Without it GPT-2 kept 80 % of its
weights float32 as a custom module's."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from service.settings import get_settings
from service.spec import JobSpec

pytest.importorskip("transformers")

GPT2: dict[str, Any] = {
    "model": {"entrypoint": "tests.hf_nets:gpt2_lm", "kwargs": {"dim": 16, "layers": 1}},
    "dataset": {"builtin": "python-text", "kwargs": {"max_chars": 4000}},
    "task": "language_modeling",
}


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SPARQ_ENTRYPOINT_MODULES", "tests")
    monkeypatch.setenv("SPARQ_WEIGHTS_DIRS", str(tmp_path))
    monkeypatch.setenv("SPARQ_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))


def test_conv1d_layers_become_linears_computing_the_same() -> None:
    from transformers.pytorch_utils import Conv1D

    from tests.hf_nets import gpt2_lm
    from workers.compress.engine import compressible_layers, float_parameters
    from workers.zoo.models import FromConv1D, linear_layers

    torch.manual_seed(0)
    original = gpt2_lm(dim=16, layers=1).eval()
    model = copy.deepcopy(original)
    names = linear_layers(model)
    assert names == [n for n, m in original.named_modules() if isinstance(m, Conv1D)]
    assert len(names) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    for name in names:
        lin, conv = model.get_submodule(name), original.get_submodule(name)
        assert isinstance(lin, FromConv1D)
        assert torch.equal(lin.weight, conv.weight.t())
    with torch.no_grad():
        want, got = original(_ids()).logits, model(_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    layers = {i.name for i in compressible_layers(model)}
    assert set(names) <= layers
    assert not set(float_parameters(model)) & {f"{n}.weight" for n in names}
    assert linear_layers(model) == []  # idempotent


def test_the_job_says_it_and_a_checkpoint_reloads_it() -> None:
    from workers.jobs import checkpoint as ckpt
    from workers.jobs.baseline import describe_model
    from workers.zoo.models import FromConv1D, build_model

    spec = JobSpec.model_validate(GPT2)
    description = describe_model(spec)
    assert "transformer.h.0.attn.c_attn" in {li["name"] for li in description.layers}
    assert "Conv1D" in description.adjusted["transformer.h.0.mlp.c_fc"]
    torch.manual_seed(1)
    model = build_model(spec.model).eval()
    data = ckpt.encode(model, model_spec=spec.model)
    back = ckpt.decode(data, allow_modules=("tests.hf_nets",)).model
    assert isinstance(back.get_submodule("transformer.h.0.attn.c_attn"), FromConv1D)
    with torch.no_grad():
        assert torch.equal(back(_ids()).logits, model(_ids()).logits)


def test_weights_of_the_original_model_warm_start_the_job(tmp_path: Path) -> None:
    from tests.hf_nets import gpt2_lm
    from workers.jobs.baseline import load_baseline, train_baseline

    torch.manual_seed(2)
    original = gpt2_lm(dim=16, layers=1).eval()  # the user's model, Conv1D and all
    path = tmp_path / "gpt2.pt"
    torch.save(original.state_dict(), path)
    spec = {**GPT2, "baseline": {"weights": str(path), "epochs": 0}}
    base = train_baseline(spec)
    model = load_baseline(JobSpec.model_validate(spec), base.state).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(_ids()).logits, original(_ids()).logits, rtol=1e-5, atol=1e-6
        )


def test_a_model_without_conv1d_is_untouched() -> None:
    from workers.zoo.models import digits_mlp, linear_layers

    model = digits_mlp(hidden=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert linear_layers(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
