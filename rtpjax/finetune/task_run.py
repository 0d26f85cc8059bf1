"""One task's host state in a run: its grain stream, schedule, and where it stands inside its
current optimizer step (what a checkpoint must hold to resume it exactly)."""

from __future__ import annotations

import dataclasses
from typing import Any

from rtpjax.finetune.config import TaskConfig
from rtpjax.finetune.data import TaskStream


@dataclasses.dataclass
class TaskRun:
    """Host state of one task: its stream, schedule and where it stands."""

    cfg: TaskConfig
    adapter: Any  # AdapterConfig
    stream: TaskStream
    eval_rows: list[dict]
    total_steps: int
    seed: int
    lr: Any  # optax schedule: learning rate at an optimizer step
    step: int = 0  # optimizer steps done
    consumed: int = 0  # rows of the current optimizer step already fed
    start_state: dict | None = None  # stream position at the start of the current step
    buffer: list = dataclasses.field(default_factory=list)
    norm: float = 0.0  # target tokens of the current optimizer step
    done: bool = False

    def next_micro(self) -> tuple[list[dict], bool] | None:
        """The next micro-batch and whether it completes an optimizer step; None when finished."""
        if self.consumed == 0:
            if self.step >= self.total_steps:
                return None
            self.start_state = self.stream.get_state()
            self.buffer = self.stream.take(self.cfg.batch_size)
            if not self.buffer:
                return None
            self.norm = float(sum(r["mask"].sum() for r in self.buffer))
        rows, self.buffer = self.buffer[: self.cfg.micro], self.buffer[self.cfg.micro :]
        self.consumed += len(rows)
        return rows, not self.buffer

    def host_state(self) -> dict:
        return {
            "step": self.step,
            "consumed": self.consumed,
            "done": self.done,
            "start_state": self.start_state,
            "stream": self.stream.get_state(),
        }

    def load_host_state(self, s: dict) -> None:
        self.step, self.consumed, self.done = s["step"], s["consumed"], s["done"]
        self.start_state = s["start_state"]
        if self.consumed:
            self.stream.set_state(self.start_state)
            rows = self.stream.take(self.cfg.batch_size)
            self.norm = float(sum(r["mask"].sum() for r in rows))
            self.buffer = rows[self.consumed :]
        self.stream.set_state(s["stream"])
