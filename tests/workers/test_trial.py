from __future__ import annotations

import pytest
import torch

from workers.compress.train import pick_device
from workers.search.trials import trial_number


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
