"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM: the step in progress ends, a checkpoint is
written, and the process exits 128 + the signal's number (130, 143) after printing how to resume.

A signal only sets a flag: raising in the middle of a step (Python's default for SIGINT) would lose every
step since the last checkpoint, and under DDP leave the other ranks waiting in an all-reduce forever. The
loop asks `agreed()` between steps; under DDP that all-reduces the flag, so all ranks stop after the same
step even when the signal reached only one of them. A second signal stops the process at once, the default
way, for a step that does not end.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """The run stopped on a signal after a checkpoint; `main` prints how to resume and exits `exit_status`."""

    def __init__(self, signum: int, step: int, checkpoint: Path, is_main: bool):
        self.signum, self.step, self.checkpoint, self.is_main = signum, step, checkpoint, is_main
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended


class StopRequest:
    """While entered, SIGINT and SIGTERM request a stop instead of ending the process."""

    def __init__(self, world_size: int, device: torch.device, announce: bool):
        self.world_size, self.device, self.announce = world_size, device, announce
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        # Handlers can only be set from the main thread; a run started elsewhere keeps the default behaviour.
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:
            self.__exit__(None, None, None)
            signal.raise_signal(signum)
            return
        self.signum = signum
        if self.announce:
            # os.write, not print: a handler may run while the main thread is inside a print to stderr.
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step to write a checkpoint "
                        "(send it again to stop at once, losing the steps since the last checkpoint)\n".encode())

    def agreed(self) -> int:
        """The signal to stop on (0: go on), the same on every rank: the largest any rank received."""
        if self.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
