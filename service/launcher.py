"""`python -m service` as a child process on a loopback port: start it, wait until it serves, stop it.

The one way everything outside the service runs it as its own process: the demo (a service per
training run), the tests and the reliability benchmarks (which kill it with SIGKILL and restart it on
the same state dir, as an operator's supervisor would), and the stream benchmark.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import httpx

from service.errors import ServiceError

LOOPBACK = "127.0.0.1"
# The folder holding the `service` package: `python -m service` run there imports this copy of it.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on now (the OS picks it when binding port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServiceDidNotStart(ServiceError, RuntimeError):
    """The service exited before it served (exit_code), or did not answer in time and was killed (None)."""

    def __init__(self, message: str, exit_code: int | None):
        super().__init__(message)
        self.exit_code = exit_code


class ServiceProcess:
    """`python -m service ARGS --host HOST --port PORT` in a subprocess; restartable on the same port. HOST is
    the loopback unless given: another node's process (a Ray Train worker) reaches the service at this node's
    address only.

    Its output goes to `log` (appended, so one file spans restarts) or, without one, to a pipe read once
    the process has ended. `cwd` is where `python -m service` imports the service from.
    """

    def __init__(self, args: Sequence[str], port: int | None = None, *, log: Path | None = None,
                 cwd: Path = PACKAGE_ROOT, log_level: str | None = "warning", host: str = LOOPBACK):
        self.args, self.cwd, self.host = list(args), cwd, host
        self.log = Path(log) if log is not None else None
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_level = log_level  # None: the service's own default (info: every request is logged)
        self.proc: subprocess.Popen | None = None
        self._piped = b""

    def command(self) -> list[str]:
        level = ["--log-level", self.log_level] if self.log_level else []
        return [sys.executable, "-m", "service", *self.args, "--host", self.host, "--port", str(self.port), *level]

    def start(self, wait: bool = True, ready_within: float = 60.0) -> "ServiceProcess":
        """Start the process; with `wait`, return once it serves (see wait_ready)."""
        self._piped = b""
        if self.log is None:
            self.proc = subprocess.Popen(self.command(), cwd=self.cwd, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT)
        else:
            with open(self.log, "ab") as log:  # the child keeps its own handle
                self.proc = subprocess.Popen(self.command(), cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(ready_within)
        return self

    def wait_ready(self, within: float = 60.0) -> None:
        """Return once /healthz answers 200 (it needs no token).

        Raises ServiceDidNotStart if the process exits first, or, after killing it, if it did not
        answer within `within` seconds: either way no process is left behind.
        """
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceDidNotStart(f"the service exited with {self.proc.returncode}"
                                         f"{self._where()}:\n{self.output()[-3000:]}", self.proc.returncode)
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.kill9()
        raise ServiceDidNotStart(f"the service did not answer on {self.url} within {within:.0f} s{self._where()}:\n"
                                 f"{self.output()[-3000:]}", None)

    def kill9(self) -> None:
        """SIGKILL, as a crash would end it: no clean shutdown, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it has not ended within `grace` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill9()

    def output(self) -> str:
        """What the service wrote: its log file, or what came down the pipe (only once it has ended)."""
        if self.log is not None:
            return self.log.read_text(errors="replace") if self.log.exists() else ""
        if self.proc is not None and self.proc.poll() is not None and self.proc.stdout is not None:
            self._piped += self.proc.stdout.read()  # empty once read: nothing is counted twice
        return self._piped.decode(errors="replace")

    def _where(self) -> str:
        return f" (log {self.log})" if self.log is not None else ""

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

