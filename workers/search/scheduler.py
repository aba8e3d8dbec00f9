"""Multi-objective early stopping: successive halving whose promotion rule is the
non-dominated rank, as a Ray Tune trial scheduler.

Neither Ray Tune's schedulers nor Optuna's pruners handle two objectives, so this is
ours. A trial reports its ``quality`` (the front's quality axis,
``dashboards.quality`` of its task: accuracy, or ``1/perplexity`` for language
modelling; ``accuracy`` when absent) and ``size_bytes``
at the end of each fine-tune epoch; at each rung (epochs ``grace * eta**k``) it is
compared with every trial that reached the same rung before it (asynchronous
successive halving: no trial waits for others). It goes on if it is among the best
``1/eta`` of the rung, ordered by
non-dominated rank and, within a rank, by its hypervolume contribution (in the
objectives the front uses: size over the baseline's, and 1 - quality). A rung with fewer
than ``eta`` trials promotes everyone: there is nothing yet to compare with.

Stopped trials are never fully trained points: the driver records them as
``stopped`` and keeps them out of the front and the export, and Optuna is told they
were pruned.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from dashboards import hypervolume_2d, minimized, non_dominated_ranks

Point = tuple[float, float]  # (size / baseline size, 1 - quality): both minimized


def milestones(epochs: int, grace: int, eta: int) -> list[int]:
    """Rungs (1-based epochs) strictly before the last epoch: grace, grace*eta, ..."""
    out, m = [], grace
    while m < epochs:
        out.append(m)
        m *= eta
    return out


def promotion_order(points: dict[str, Point]) -> list[str]:
    """Trial ids best first: non-dominated rank, then hypervolume contribution (larger
    first) within a rank, then id for a stable order."""
    ids = list(points)
    values = [points[i] for i in ids]
    ranks = non_dominated_ranks(values)
    ref = (max(1.0, *(v[0] for v in values)) * 1.1, 1.1)

    def contribution(k: int) -> float:
        layer = [values[j] for j in range(len(ids)) if ranks[j] == ranks[k]]
        rest = [values[j] for j in range(len(ids)) if ranks[j] == ranks[k] and j != k]
        return hypervolume_2d(layer, ref) - hypervolume_2d(rest, ref)

    order = sorted(range(len(ids)), key=lambda k: (ranks[k], -contribution(k), ids[k]))
    return [ids[k] for k in order]


class ParetoHalving(FIFOScheduler):
    """Asynchronous successive halving on two objectives (see the module docstring).

    With ``state_path``, the rungs are written there (atomically) at every decision
    and read back by a scheduler made with the same path, so a resumed search compares
    its trials with those that reached the rungs before it.
    """

    def __init__(
        self,
        *,
        epochs: int,
        grace: int,
        eta: int,
        baseline_size_bytes: int,
        state_path: Path | None = None,
    ) -> None:
        super().__init__()
        if grace < 1 or eta < 2:
            raise ValueError(f"need grace >= 1 and eta >= 2, got grace={grace}, eta={eta}")
        self.eta, self.baseline = eta, max(1, baseline_size_bytes)
        self.rungs: dict[int, dict[str, Point]] = {m: {} for m in milestones(epochs, grace, eta)}
        self.stopped: dict[str, int] = {}  # trial id -> the rung it was stopped at
        self.state_path = state_path
        if state_path is not None and state_path.exists():
            saved = json.loads(state_path.read_text())
            for m, points in saved["rungs"].items():
                if int(m) in self.rungs:  # the same spec, so the same rungs
                    self.rungs[int(m)] = {k: (v[0], v[1]) for k, v in points.items()}
            self.stopped = {k: int(v) for k, v in saved["stopped"].items()}

    def _save(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rungs": self.rungs, "stopped": self.stopped}))
        tmp.replace(self.state_path)

    def decide(self, trial_id: str, epoch: int, quality: float, size_bytes: int) -> bool:
        """Record the trial at rung ``epoch``; True if it goes on."""
        rung = self.rungs.get(epoch)
        if rung is None:
            return True
        rung[trial_id] = minimized(quality, size_bytes, self.baseline)
        keep = max(1, math.floor(len(rung) / self.eta))
        go_on = len(rung) < self.eta or trial_id in promotion_order(rung)[:keep]
        if not go_on:
            self.stopped[trial_id] = epoch
        self._save()
        return go_on

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get("final") or "epoch" not in result:
            return TrialScheduler.CONTINUE
        go_on = self.decide(
            trial.trial_id,
            int(result["epoch"]),
            float(result.get("quality", result["accuracy"])),
            int(result["size_bytes"]),
        )
        return TrialScheduler.CONTINUE if go_on else TrialScheduler.STOP

    def debug_string(self) -> str:
        sizes = {m: len(r) for m, r in self.rungs.items()}
        return f"ParetoHalving(eta={self.eta}, rungs={sizes}, stopped={len(self.stopped)})"
