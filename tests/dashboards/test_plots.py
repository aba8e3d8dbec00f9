"""Plot data (checked directly) and the renderers (real files, checked for content)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from dashboards import (
    FRONT_RGB,
    PlotPoint,
    front_plot,
    hypervolume_plot,
    policy_lines,
    policy_plot,
    render_views,
    sparq_front,
)
from dashboards._pareto import FrontPoint


def _policy(rng: random.Random) -> dict[str, object]:
    return {
        "layers": {
            name: {"bits": rng.choice([2, 3, 4, 8]), "sparsity": round(rng.random() * 0.9, 3)}
            for name in ("1", "3", "5")
        },
        "noise_rate": 0.5,
        "noise_block": 4,
    }


def _points(seed: int, n: int = 25) -> list[PlotPoint]:
    rng = random.Random(seed)
    return [
        PlotPoint(f"t{i:02d}", rng.randint(70, 99) / 100, rng.randint(2, 40) * 100, _policy(rng))
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_front_plot_data_is_the_sparq_front(seed: int) -> None:
    pts = _points(seed)
    fp = front_plot(pts, baseline_accuracy=0.97, baseline_size_bytes=10_000, chosen_trial_id="t03")
    front = sparq_front([FrontPoint(p.trial_id, p.accuracy, p.size_bytes) for p in pts], 10_000)
    assert [p.trial_id for p in fp.front] == [p.trial_id for p in front.points]
    assert fp.hypervolume == front.hypervolume
    assert fp.trials == pts
    assert fp.chosen is not None
    assert fp.chosen.trial_id == "t03"
    with pytest.raises(ValueError, match="chosen_trial_id='nope' is not among the 25"):
        front_plot(pts, baseline_accuracy=0.97, baseline_size_bytes=10_000, chosen_trial_id="nope")


def test_hypervolume_plot_steps_count_failed_trials_and_hold_the_value() -> None:
    pts = _points(0, 4)
    hp = hypervolume_plot([pts[0], None, pts[1], None, pts[2]], baseline_size_bytes=10_000)
    assert hp.steps == [1, 2, 3, 4, 5]
    assert hp.values[1] == hp.values[0]
    assert hp.values[3] == hp.values[2]
    assert hp.values == sorted(hp.values)
    assert hp.values[-1] == pytest.approx(
        sparq_front(
            [FrontPoint(p.trial_id, p.accuracy, p.size_bytes) for p in pts[:3]], 10_000
        ).hypervolume
    )


def test_policy_plot_and_lines_show_every_knob() -> None:
    p = PlotPoint(
        "t1",
        0.9,
        1000,
        {
            "layers": {
                "a": {"bits": 4, "sparsity": 0.25},
                "b": {"bits": 8, "sparsity": 0.0, "method": "x"},
            },
            "noise_rate": 0.5,
        },
    )
    pp = policy_plot(p)
    assert (pp.layers, pp.bits, pp.sparsity) == (["a", "b"], [4, 8], [0.25, 0.0])
    assert pp.extra == {"noise_rate": 0.5}
    assert policy_lines(p.policy) == [
        "a: bits 4, sparsity 25.0%",
        "b: bits 8, sparsity 0.0%, method x",
        "noise_rate 0.5",
    ]
    with pytest.raises(ValueError, match="trial t2 has no per-layer policy"):
        policy_plot(PlotPoint("t2", 0.9, 1000, {}))


def test_rendered_views_are_real_self_contained_files(tmp_path: Path) -> None:
    from PIL import Image

    pts = _points(1)
    fp = front_plot(pts, baseline_accuracy=0.97, baseline_size_bytes=10_000, chosen_trial_id="t05")
    hp = hypervolume_plot([*pts[:3], None, *pts[3:]], baseline_size_bytes=10_000)
    paths = render_views(fp, hp, tmp_path)
    assert sorted(p.name for p in paths) == [
        "front.html",
        "front.png",
        "hypervolume.png",
        "policy.png",
    ]
    for p in paths:
        if p.suffix == ".png":
            with Image.open(p) as im:
                assert im.format == "PNG"
                assert im.size[0] >= 600
    with Image.open(tmp_path / "front.png") as im:  # the front is drawn in its colour
        rgb = im.convert("RGB")
        orange = sum(
            1
            for px in rgb.getdata()  # type: ignore[attr-defined]
            if all(abs(a - b) <= 12 for a, b in zip(px, FRONT_RGB, strict=True))
        )
    assert orange > 200

    html = (tmp_path / "front.html").read_text()
    assert len(html) > 1_000_000  # plotly.js itself is embedded
    assert not re.search(r"<script[^>]+src=", html)  # and nothing is fetched from a network
    data = json.loads(
        re.search(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\]),\s*\{", html, re.S)[1]
    )  # type: ignore[index]
    front_trace = next(t for t in data if t["name"].startswith("Pareto front"))
    assert len(front_trace["x"]) == len(fp.front)
    chosen = next(p for p in fp.front + fp.trials if p.trial_id == "t05")
    hover = next(h for h in data[0]["hovertext"] if h.startswith("<b>t05</b>"))
    for line in policy_lines(chosen.policy):  # hovering shows the per-layer policy
        assert line in hover
