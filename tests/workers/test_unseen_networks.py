"""Networks written the way users write them, with nothing in sparq for them ("Real
models", item 1): a ViT whose class token and position embeddings are bare
``nn.Parameter``s, and an SE-ResNet whose squeeze-excitation is 6 channels wide. Each
is described (the job's reports), then runs as a trial with the default search space
and its checkpoint reloads to the same accuracy; before, the first failed the whole
job in ``describe_model`` and every trial of the second failed."""

from __future__ import annotations

import optuna
import pytest
import torch

from search_spaces import policy_from_params, to_optuna
from service.spec import JobSpec
from tests import nets
from workers.jobs.baseline import describe_model, evaluate_bytes, knob_space, train_baseline
from workers.jobs.trial import compress


def _spec(name: str) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": name,
            "model": {"entrypoint": f"tests.nets:{name}"},
            "dataset": {"builtin": "digits"},
            "baseline": {"epochs": 2},
            "search_space": {"finetune_epochs": 1},
            "search": {"trials": 1},
        }
    )


@pytest.mark.parametrize("name", nets.UNSEEN)
def test_an_unseen_network_is_described_searched_and_exported(name: str) -> None:
    spec = _spec(name)
    model = describe_model(spec)
    assert model.layers
    assert model.left_dense  # the classifier at least, with its reason
    assert all(why for why in model.left_dense.values())
    baseline = train_baseline(spec.model_dump(mode="json"))
    space = knob_space(spec, model)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(2):  # two policies of the default space
        policy = policy_from_params(space, study.ask(to_optuna(space)).params)
        data, metrics = compress(spec, policy, baseline.state, torch.device("cpu"), seed=0)
        assert metrics["size_bytes"] == len(data) < baseline.size_bytes
        again = evaluate_bytes(data, spec, torch.device("cpu"))
        assert again.accuracy == metrics["accuracy"]


def test_a_width_no_block_divides_is_said_on_the_job() -> None:
    model = describe_model(_spec("se_resnet"))
    assert model.adjusted == {
        "excite": "noise_block 4 does not divide its input size 6: blocks of 3"
    }
