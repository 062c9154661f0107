"""The time budget of a run (``max_time_s``), counted over all sessions of a resumed run, in
wall-clock seconds (``time_budget="wall"``) or CPU seconds of this process (``"process"``: the
fair budget when benchmark rows share a machine with one thread per row)."""

from __future__ import annotations

import time

from pyro_seqlatent.infer.config import Length


class Budget:
    """Clocks of a run that already spent ``elapsed`` budget seconds and ``wall_elapsed``
    wall-clock seconds in earlier sessions."""

    def __init__(self, length: Length, elapsed: float = 0.0, wall_elapsed: float = 0.0):
        self.max_time_s = length.max_time_s
        self.clock = time.perf_counter if length.time_budget == "wall" else time.process_time
        self.start = self.clock() - elapsed
        self.wall_start = time.perf_counter() - wall_elapsed

    def elapsed(self) -> float:
        """Seconds on the budget's clock, all sessions included."""
        return self.clock() - self.start

    def wall_elapsed(self) -> float:
        return time.perf_counter() - self.wall_start

    def spent(self) -> bool:
        return self.max_time_s is not None and self.elapsed() >= self.max_time_s

    def record(self, state: dict) -> None:
        """Write the elapsed times into the loop state (before a checkpoint)."""
        state["elapsed"] = self.elapsed()
        state["wall_elapsed"] = self.wall_elapsed()
