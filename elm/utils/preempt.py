"""Preemption and fault injection shared by the training loops.

SLURM (and most schedulers) send SIGTERM before killing a job. ``Preemption`` turns it into a
flag that the loop checks at step boundaries: it writes a checkpoint and exits with 143, so
``resume=true`` continues exactly where it stopped.

``ELM_FAULT_KILL_AT_STEP=N`` makes a loop send itself ``ELM_FAULT_SIGNAL`` (``KILL`` by default,
or ``TERM``) right after the checkpoint of step N: the crash tests use it to stop a run at a known
point with a real signal (nothing else reads these variables).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path


class Preempted(SystemExit):
    """Raised after the checkpoint that a SIGTERM asked for; exit status 143 (128 + SIGTERM)."""

    def __init__(self, message: str) -> None:
        super().__init__(143)
        self.message = message


class Preemption:
    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def __enter__(self) -> Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def maybe_inject_kill(step: int) -> None:
    """Signal this process after step ``ELM_FAULT_KILL_AT_STEP`` (tests of crash recovery)."""
    at = os.environ.get("ELM_FAULT_KILL_AT_STEP")
    if at is not None and int(at) == step:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("ELM_FAULT_SIGNAL", "KILL")))


def step_checkpoint(step: int, every: int | None, preemption: Preemption, save: Callable[[], object],
                    state_path: Path, *, stop: bool | None = None) -> None:  # fmt: skip
    """At a step boundary: checkpoint every ``every`` steps; on SIGTERM checkpoint and raise
    :class:`Preempted`. ``save`` runs on every rank; ``stop``: the (all-rank) stop flag."""
    stop = preemption.requested if stop is None else stop
    periodic = bool(every) and step % every == 0
    if periodic or stop:
        save()
    if stop:
        raise Preempted(f"preempted at step {step}: checkpoint in {state_path}; "
                        f"continue with resume=true hydra.run.dir={state_path.parent}")  # fmt: skip
    if periodic:
        maybe_inject_kill(step)
