"""Which tasks train now: admit queued tasks while a slot is free and the memory estimate fits,
retire finished ones, and start the next without stopping the others. Host-only, no model.

Admission is first-in first-out: the head of the queue waits for room rather than being overtaken
by a smaller task behind it (no starvation, and a deterministic schedule, which resuming from a
checkpoint relies on). A task that cannot fit even alone is refused when the queue is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class Dispatcher:
    num_slots: int  # G: adapter slots of the compiled step
    budget: int | None  # bytes the running tasks may use together (None: slots are the only limit)
    estimate: Callable[[str], int]  # task name → bytes it adds while running
    queue: list[str] = dataclasses.field(default_factory=list)
    running: dict[str, int] = dataclasses.field(default_factory=dict)  # task → slot
    finished: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.num_slots < 1:
            raise ValueError(f"num_slots={self.num_slots} must be >= 1")
        for name in self.queue:
            self._check_alone(name)

    def _check_alone(self, name: str) -> None:
        need = self.estimate(name)
        if self.budget is not None and need > self.budget:
            raise ValueError(
                f"task {name!r} needs about {need / 2**20:.1f} MiB, more than the dispatcher's "
                f"memory budget of {self.budget / 2**20:.1f} MiB on its own; lower its "
                "micro_batch_size or max_length, or raise dispatcher.memory_budget"
            )

    def submit(self, name: str) -> None:
        if name in self.queue or name in self.running or name in self.finished:
            raise ValueError(f"task {name!r} was already submitted")
        self._check_alone(name)
        self.queue.append(name)

    @property
    def used(self) -> int:
        return sum(self.estimate(n) for n in self.running)

    def free_slots(self) -> list[int]:
        taken = set(self.running.values())
        return [s for s in range(self.num_slots) if s not in taken]

    def admit(self) -> list[tuple[str, int]]:
        """Start queued tasks in order while they fit; (task, slot) for each one started."""
        started = []
        while self.queue:
            free = self.free_slots()
            if not free:
                break
            name = self.queue[0]
            if self.budget is not None and self.used + self.estimate(name) > self.budget:
                break
            self.queue.pop(0)
            self.running[name] = free[0]
            started.append((name, free[0]))
        return started

    def retire(self, name: str) -> int:
        """Mark a running task finished; returns the slot it frees."""
        if name not in self.running:
            raise ValueError(f"task {name!r} is not running; running: {sorted(self.running)}")
        slot = self.running.pop(name)
        self.finished.append(name)
        return slot

    @property
    def done(self) -> bool:
        return not self.queue and not self.running

    def state_dict(self) -> dict:
        return {
            "queue": list(self.queue),
            "running": dict(self.running),
            "finished": list(self.finished),
        }

    def load_state_dict(self, state: dict) -> None:
        self.queue = list(state["queue"])
        self.running = {k: int(v) for k, v in state["running"].items()}
        self.finished = list(state["finished"])
