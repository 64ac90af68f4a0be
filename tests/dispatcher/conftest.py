"""Fixtures shared by the dispatcher tests: real dispatcher subprocesses."""

import pytest

from minard.testing.dispatcher import DispatcherProcess


@pytest.fixture
def start_dispatcher(cfg, tmp_path):
    """Start dispatcher subprocesses with the default grants and config overrides; stop them all by pid."""
    procs = []

    def start(**settings) -> DispatcherProcess:
        base = {"redis_url": cfg["redis_url"],
                "dispatcher_accounting_dir": cfg["dispatcher_accounting_dir"],
                "dispatcher_finished_timeout": 5, "dispatcher_shutdown_wait": 0.5}
        base.update(settings)
        proc = DispatcherProcess(log_path=tmp_path / f"dispatcher-{len(procs)}.log", **base)
        procs.append(proc)
        return proc.start()

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture
def disp(start_dispatcher):
    return start_dispatcher()
