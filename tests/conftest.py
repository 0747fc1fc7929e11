"""Fixtures for tests that run real fedstream processes.

    def test_cluster(procs, free_port, wait_for):
        address = f"127.0.0.1:{free_port()}"
        server = procs("server", "server", "--address", address, "--run-dir", "run")
        wait_for(lambda: (procs.workdir / "run" / "coordinator.json").exists(), 60,
                 "the server to write coordinator.json", alive=[server])
        procs("client-0", "client", "--server", address)
        assert procs.wait_all(120) == {"server": 0, "client-0": 0}

`procs` starts `python -m fedstream ARGS...` with its output in a log file, in its own
process group, and on teardown stops every process (and any child it left) that is still
running, then prints the tail of the log of each one that failed or had to be stopped,
so a failing test shows what its processes said. Nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The `containers` tier builds images for minutes: it runs only when a `-m`
    expression names it (`.ci/containers`), never as part of `make test` or another tier."""
    if "containers" in (config.getoption("markexpr") or ""):
        return
    left_out = [item for item in items if item.get_closest_marker("containers")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("containers")]


STOP_GRACE = 10.0
"""Seconds a process gets to exit after SIGTERM before it is killed."""
LOG_TAIL_LINES = 40


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is listening on at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    alive: Iterable[FedstreamProcess] = (),
) -> T:
    """Poll `predicate` until it returns something truthy, and return that value.

    Raises AssertionError naming `what` after `timeout` seconds, or as soon as one of the
    `alive` processes exits (waiting longer for something it should have done is futile).
    """
    watched = list(alive)
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        for process in watched:
            if not process.alive:
                raise AssertionError(
                    f"{process.name} exited with code {process.returncode} while waiting for "
                    f"{what}\n{process.describe()}"
                )
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class FedstreamProcess:
    """One process started by `procs`: its name, command line, log file and Popen."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, popen: subprocess.Popen[bytes]
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.popen = popen
        self.stopped = False
        """True when teardown (or `stop`) had to end it rather than it exiting by itself."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while it runs (a signal shows as its negative number)."""
        return self.popen.poll()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        """Its exit code, waiting up to `timeout` seconds; AssertionError if still running."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout:g}s\n{self.describe()}"
            ) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def describe(self, lines: int = LOG_TAIL_LINES) -> str:
        """Command line, state and the tail of the log: what a failure message needs."""
        code = self.returncode
        state = "running" if code is None else f"exit code {code}"
        if self.stopped:
            state += ", stopped by the test"
        return (
            f"---- {self.name} (pid {self.pid}, {state}): {shlex.join(self.argv)}\n"
            f"---- last {lines} lines of {self.log_path}:\n{self.log_tail(lines)}\n"
            f"---- end of {self.name}"
        )

    def send_signal(self, sig: int) -> None:
        """Signal its whole process group (itself and any children it started)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        if self.alive:
            self.stopped = True
            self.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        # Whatever is left in the group (the process itself, or children it orphaned).
        self.send_signal(signal.SIGKILL)
        return self.popen.wait()


class ProcessFactory:
    """Starts processes for one test and reaps them all at its end (the `procs` fixture)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        """Working directory of every process: relative paths land in the test's tmp_path."""
        self.log_dir = workdir / "logs"
        self.started: list[FedstreamProcess] = []

    def __call__(
        self,
        name: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> FedstreamProcess:
        """Start `python -m fedstream ARGS...`, logging to LOG_DIR/NAME.log."""
        return self.start(name, [sys.executable, "-m", "fedstream", *args], env=env, cwd=cwd)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> FedstreamProcess:
        """Start any command, logged and reaped like a fedstream process.

        The environment is this one without FEDSTREAM_* variables (so a developer's
        settings cannot change a test), plus `env`.
        """
        if any(p.name == name for p in self.started):
            raise ValueError(f"a process named {name!r} was already started in this test")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")}
        environ["PYTHONUNBUFFERED"] = "1"
        environ.update(env or {})
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd or self.workdir,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = FedstreamProcess(name, argv, log_path, popen)
        self.started.append(process)
        return process

    def wait_all(
        self,
        timeout: float,
        processes: Iterable[FedstreamProcess] | None = None,
        *,
        fail_fast: bool = True,
    ) -> dict[str, int]:
        """Exit codes by name once every process (default: all started) has exited.

        With `fail_fast`, the first non-zero exit ends the wait at once with an
        AssertionError showing that process's log, rather than waiting out the timeout
        for the others, which usually hang without it.
        """
        waiting = list(self.started if processes is None else processes)

        def finished() -> bool:
            if fail_fast:
                for process in waiting:
                    if process.returncode not in (None, 0):
                        raise AssertionError(
                            f"{process.name} failed with exit code {process.returncode}\n"
                            f"{process.describe()}"
                        )
            return all(not p.alive for p in waiting)

        running = ", ".join(p.name for p in waiting)
        wait_for(finished, timeout, f"{running} to exit", interval=0.2)
        return {p.name: p.wait(0) for p in waiting}

    def reap(self) -> list[FedstreamProcess]:
        """Stop everything still running; the processes that failed or had to be stopped."""
        for process in self.started:
            if process.alive:
                process.stopped = True
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(max(0.0, deadline - time.monotonic()))
            process.stop(grace=0.0)
        return [p for p in self.started if p.stopped or p.returncode != 0]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessFactory]:
    """A factory of fedstream processes that leaves none behind, even when the test fails."""
    factory = ProcessFactory(tmp_path)
    try:
        yield factory
    finally:
        for process in factory.reap():
            print(process.describe(), file=sys.stderr)


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    """`free_port()`: a TCP port on 127.0.0.1 nothing listens on."""
    return free_port


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., object]:
    """`wait_for(predicate, timeout, what, alive=[...])`: poll with a deadline."""
    return wait_for
