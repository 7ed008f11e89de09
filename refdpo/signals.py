"""Stopping a run cleanly: Ctrl-C or SIGTERM (a cluster's time limit) asks the training loop to stop after the
step it is in (in a multi-process launch, at the next report or save), save a checkpoint and print the command
that resumes it; a second signal stops at once."""

from __future__ import annotations

import logging
import signal
import threading

import torch

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """A context in which SIGINT/SIGTERM set a flag instead of raising in the middle of a step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum
        log.warning("%s: stopping after this step, with a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    def requested(self, accelerator, agree: bool = True) -> int:
        """The signal that asked to stop (0: none). With several processes it must be agreed by all (a rank the
        signal has not reached yet stops with the others, so that no collective is left waiting): that happens
        only when `agree` (the caller's points of synchronisation); elsewhere the answer is 0."""
        flag = self.signum or 0
        if accelerator.num_processes > 1:
            if not agree:
                return 0
            agreed = torch.tensor([flag], device=accelerator.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
            flag = int(agreed.item())
        return flag
