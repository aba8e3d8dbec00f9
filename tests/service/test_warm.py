"""Warm drivers (service/warm.py, workers/search/zygote.py): real processes, with a
stand-in for the driver's main so that no job runs (the e2e tests run real ones)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import warm as warm_mod
from service.settings import Settings
from service.warm import ForkedDriver, WarmDrivers

TARGET = "tests.service.test_warm:fake_driver"


def fake_driver(argv: list[str]) -> int:
    """Runs in the forked child: says who and where it is, exits with the code the job
    id names (``exit-7``: 7)."""
    home = Path(os.environ["SPARQ_HOME"])
    job = argv[0]
    (home / f"{job}.json").write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "sid": os.getsid(0),
                "argv": argv,
                "title": Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode(),
                "home": os.environ["SPARQ_HOME"],
            }
        )
    )
    print(f"fake driver for {job}", flush=True)  # noqa: T201 - goes to driver.log
    return int(job.rsplit("-", 1)[1])


def renderer_left_running(argv: list[str]) -> int:
    """As a driver whose live-views thread (a daemon) still holds its renderer process
    when the driver returns: a cold interpreter's exit stops that process first."""
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    started = threading.Event()

    def views() -> None:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as renderer:
            renderer.submit(abs, -1).result()
            started.set()
            threading.Event().wait()  # never leaves the executor's block

    threading.Thread(target=views, daemon=True).start()
    started.wait(120)
    return 0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, database_url=None, ray_address="127.0.0.1:1").prepare()


@pytest.fixture
def warm(settings: Settings) -> Iterator[WarmDrivers]:
    w = WarmDrivers(settings, target=TARGET)
    w.start()
    try:
        assert w.wait_ready(60), (settings.home / "run" / "zygote.log").read_text()
        yield w
    finally:
        w.stop()


def _ended(driver: ForkedDriver, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while driver.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    # the warm process reaps it within its poll (0.2 s)
    while not list(driver.exits.glob(f"{driver.pid}-*")) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_driver_is_forked_warm_in_its_own_session_with_its_log(
    warm: WarmDrivers, settings: Settings
) -> None:
    driver = warm("exit-7", False)
    assert isinstance(driver, ForkedDriver)
    assert driver.pid != warm.proc.pid  # type: ignore[union-attr]
    _ended(driver)
    assert not driver.running()
    assert driver.describe_exit() == "exited with code 7"
    seen = json.loads((settings.home / "exit-7.json").read_text())
    assert seen["pid"] == driver.pid
    assert seen["sid"] == driver.pid  # a session of its own: the launcher signals its group
    assert seen["argv"] == ["exit-7"]
    assert seen["home"] == str(settings.home)  # the driver's environment
    assert seen["title"].strip().endswith("-m workers.search.driver exit-7")  # what ps shows
    log = (settings.job_dir("exit-7") / "driver.log").read_text()
    assert "fake driver for exit-7" in log
    assert (warm.forked, warm.cold) == (1, 0)


def test_resume_is_passed_and_every_driver_is_a_new_process(
    warm: WarmDrivers, settings: Settings
) -> None:
    first, second = warm("a-0", True), warm("b-3", False)
    _ended(first)
    _ended(second)
    assert first.pid != second.pid
    assert json.loads((settings.home / "a-0.json").read_text())["argv"] == ["a-0", "--resume"]
    assert first.describe_exit() == "exited with code 0"
    assert second.describe_exit() == "exited with code 3"


def test_without_the_warm_process_a_driver_starts_cold(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    cold: list[tuple[str, bool]] = []

    def spawn(_: Settings, job_id: str, resume: bool) -> object:
        cold.append((job_id, resume))
        return "cold driver"

    monkeypatch.setattr(warm_mod, "spawn_driver", spawn)
    w = WarmDrivers(settings, target=TARGET)  # never started
    assert w("j-1", True) == "cold driver"
    assert cold == [("j-1", True)]
    assert (w.forked, w.cold) == (0, 1)


def test_a_dead_warm_process_means_cold_drivers(
    warm: WarmDrivers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warm_mod, "spawn_driver", lambda *_: "cold driver")
    assert warm.proc is not None
    warm.proc.kill()
    warm.proc.wait(10)
    assert warm("j-1", False) == "cold driver"
    assert warm.cold == 1


def test_a_driver_exits_like_a_cold_one_with_a_renderer_left_running(settings: Settings) -> None:
    """A forked driver ends as the interpreter would: executors stopped, then the exit
    handlers (multiprocessing joins its children). The other order waited forever on
    the renderer and held the launcher's slot (seen in bench/overhead.py's long run)."""
    w = WarmDrivers(settings, target="tests.service.test_warm:renderer_left_running")
    w.start()
    try:
        assert w.wait_ready(60)
        driver = w("render-0", False)
        assert isinstance(driver, ForkedDriver)
        _ended(driver, timeout=90)
        assert not driver.running(), (settings.job_dir("render-0") / "driver.log").read_text()
        assert driver.describe_exit() == "exited with code 0"
    finally:
        w.stop()
