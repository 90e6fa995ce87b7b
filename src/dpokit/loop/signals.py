"""SIGTERM/SIGINT during training: finish the current step, write a checkpoint, then stop."""

from __future__ import annotations

import signal
import threading


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after checkpointing; `--resume auto` continues it."""

    def __init__(self, signum: int, checkpoint):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}; "
                         "continue with --resume auto")


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT only set `.received` (a second one is fatal as usual)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:  # asked twice: give up waiting for the step to finish
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only live there
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
