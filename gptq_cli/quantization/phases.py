"""Where a quantize run's wall time goes: exclusive seconds per phase, for quant_log.json and the
summary.

One clock per process. Code marks what it is doing with `phase("hessian")`; phases nest (the Hessian
hooks run inside a forward pass), and each second is charged to the innermost phase only, so the
phases add up to the wall time measured. What runs outside every marked phase is "other"
(tokenizing, planning, Python glue).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PHASES", "phase", "restart", "report"]

# read/load: model files, calibration samples, each block's weights; forward: the calibration passes
# through the blocks (hooks included, Hessians not); hessian: folding activations into H; solve:
# GPTQ itself and putting the dequantized weights back; pack: bit-packing the checkpoint tensors;
# write: work dir and checkpoint
PHASES = ("load", "forward", "hessian", "solve", "pack", "write", "other")


class _Clock:
    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.current = "other"
        self.since = time.perf_counter()

    def switch(self, name: str) -> str:
        """Charge the time since the last switch to the current phase, make `name` current;
        return the old one."""
        now = time.perf_counter()
        self.seconds[self.current] += now - self.since
        self.since, previous, self.current = now, self.current, name
        return previous


_clock = _Clock()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the time spent inside to phase `name` (minus what inner phases take)."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}")
    previous = _clock.switch(name)
    try:
        yield
    finally:
        _clock.switch(previous)


def restart() -> None:
    """Start counting afresh (at the start of a run)."""
    _clock.restart()


def report() -> dict[str, float]:
    """Seconds per phase since the last restart, rounded to 0.01 s, and their total."""
    _clock.switch(_clock.current)
    seconds = {name: round(s, 2) for name, s in _clock.seconds.items()}
    return {**seconds, "total": round(sum(_clock.seconds.values()), 2)}
