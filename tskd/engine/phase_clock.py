"""Wall and CPU seconds of the phases of a run (data, models, run start, epochs, teardown).

Logged at a run's end: a job's overhead outside training, which benchmarks/bench_scale.py reads from a
grid's logs. Both clocks, because on a machine running more jobs than it has cores the wall time of
every phase includes waiting for a core, and the CPU time is what the phase itself costs."""

from __future__ import annotations

import time


class PhaseClock:
    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.restart()

    def restart(self) -> None:
        """The next phase starts now (time in between belongs to none)."""
        self._t = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        """The phase ``name`` ends now; the next one starts."""
        wall, cpu = self._t
        self.restart()
        self.wall[name] = self._t[0] - wall
        self.cpu[name] = self._t[1] - cpu

    def wall_line(self) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in self.wall.items())

    def cpu_line(self) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in self.cpu.items())
