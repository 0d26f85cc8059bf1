"""What a run tells its user: per-adapter loss in the log, a JSONL metrics file (truncated back to
the checkpoint on resume, so it never holds steps twice), tqdm bars per running task, and a
loss-curve PNG at the end."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

logger = logging.getLogger("rtpjax.finetune")


class MetricsLog:
    """Append-only JSONL of {"task", "step", "loss", …} records."""

    def __init__(self, path: str, resume_at: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_at is None:
            open(path, "w").close()
        else:
            with open(path, "r+b") as f:
                f.truncate(resume_at)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    @property
    def offset(self) -> int:
        return os.path.getsize(self.path)

    def records(self) -> list[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


class Progress:
    """One tqdm bar per running task (position = its slot); a no-op when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def start(self, task: str, slot: int, total: int, done: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self.bars[task] = tqdm(
            total=total,
            initial=done,
            desc=task,
            position=slot,
            unit="step",
            leave=True,
            dynamic_ncols=True,
        )

    def update(self, task: str, loss: float) -> None:
        bar = self.bars.get(task)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self, task: str) -> None:
        bar = self.bars.pop(task, None)
        if bar is not None:
            bar.close()

    def close_all(self) -> None:
        for task in list(self.bars):
            self.close(task)


def plot_losses(records: list[dict[str, Any]], path: str) -> str:
    """Training loss per task against its optimizer step (and eval loss as points) → PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    tasks = sorted({r["task"] for r in records if "loss" in r})
    for i, task in enumerate(tasks):
        color = f"C{i % 10}"
        train = [(r["step"], r["loss"]) for r in records if r["task"] == task and "loss" in r]
        ax.plot([s for s, _ in train], [v for _, v in train], color=color, label=f"{task} train")
        ev = [
            (r["step"], r["eval_loss"])
            for r in records
            if r["task"] == task and r.get("eval_loss") is not None
        ]
        if ev:
            ax.plot(
                [s for s, _ in ev],
                [v for _, v in ev],
                "o--",
                color=color,
                ms=4,
                label=f"{task} eval",
            )
    ax.set_xlabel("optimizer step (per adapter)")
    ax.set_ylabel("loss (mean over target tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if tasks:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
