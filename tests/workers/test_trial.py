from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from service.spec import JobSpec
from workers.compress.train import pick_device
from workers.search.trials import trial_datasets, trial_number


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_a_gpu_request_without_cuda_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match=r"resources.gpus=0.5 but CUDA is not available"):
        pick_device(0.5)


def test_cpu_trials_use_the_cpu() -> None:
    assert pick_device(0).type == "cpu"


def test_trial_numbers_come_from_the_name() -> None:
    assert trial_number("trial-007") == 7
    assert trial_number("weird") == 0


class _Tagged:
    def __init__(self, tag: str) -> None:
        self.experiment_tag = tag


def test_trial_names_skip_the_numbers_kept_trials_hold() -> None:
    from workers.search.trials import TrialNames

    assert [TrialNames()(_Tagged(f"{k}_x=1")) for k in (1, 2)] == ["trial-001", "trial-002"]
    resumed = TrialNames(frozenset({1, 3, 4}))  # a resumed search: 1, 3, 4 finished
    assert [resumed.number(_Tagged(str(k))) for k in (1, 2, 3)] == [2, 5, 6]
    assert resumed.number(_Tagged("odd")) == 0


def _spec(dataset: dict[str, object]) -> JobSpec:
    return JobSpec.model_validate({"model": {"builtin": "digits-mlp"}, "dataset": dataset})


def test_a_builtin_dataset_is_built_once_per_worker() -> None:
    digits = _spec({"builtin": "digits"})
    first = trial_datasets(digits)
    assert trial_datasets(digits) is first  # the next trial of this worker: kept
    other = trial_datasets(_spec({"builtin": "digits", "kwargs": {"val_fraction": 0.3}}))
    assert other is not first
    assert len(other[1]) != len(first[1])


def user_digits() -> tuple[object, object]:
    """A dataset of user code (an entrypoint), for the test below."""
    from workers.zoo.data import digits

    return digits()


def test_a_dataset_of_user_code_is_built_for_every_trial() -> None:
    spec = _spec({"entrypoint": "tests.workers.test_trial:user_digits"})
    assert trial_datasets(spec) is not trial_datasets(spec)


def test_a_trial_worker_does_not_load_mlflow() -> None:
    """A trial only appends to its outbox (the driver's sender talks to MLflow), so its
    worker skips MLflow's imports: seconds of every job's first trials."""
    code = "import sys, workers.search.trials; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
