"""Host-side accounting of the engine loop: per-step timings by phase and the run's counters."""

from __future__ import annotations

import dataclasses

import numpy as np

from rtpjax.engine.scheduler import SchedulerOutput


@dataclasses.dataclass
class StepTiming:
    """Host seconds of one engine step, by phase. `wait_s` is time blocked on the device."""

    schedule_s: float = 0.0
    prepare_s: float = 0.0  # lay out the step's inputs (numpy)
    launch_s: float = 0.0  # dispatch the jitted step (host side of enqueueing its kernels)
    wait_s: float = 0.0
    post_s: float = 0.0  # update, detokenize, stop strings, outputs


@dataclasses.dataclass
class EngineStats:
    requests_added: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    steps: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (prefix-cache hits excluded)
    decode_tokens: int = 0
    # Per step (bounded): (num_chunks, decode_only, schedule_s, prepare_s + launch_s, wait_s,
    # post_s, prepare_s, num_steps). A multi-step step's post_s is the previous step's (K tokens).
    step_log: list[tuple] = dataclasses.field(default_factory=list)

    def record_step(self, sched: SchedulerOutput, t: StepTiming) -> None:
        self.steps += 1
        n, total = len(sched.chunks), sched.num_batched_tokens
        self.prefill_tokens += sched.num_prompt_tokens
        if sched.num_steps > 1:  # multi-step decode: every row's sampled tokens are decode tokens
            self.decode_tokens += sched.num_step_tokens
        else:
            self.decode_tokens += total - sched.num_prompt_tokens
        if len(self.step_log) < 200_000:
            self.step_log.append(
                (
                    n,
                    0 < n == total,  # decode-only: every chunk has at least one token
                    t.schedule_s,
                    t.prepare_s + t.launch_s,
                    t.wait_s,
                    t.post_s,
                    t.prepare_s,
                    sched.num_steps,
                )
            )

    def host_ms(self, min_batch: int = 1, decode_only: bool = True) -> dict[str, float]:
        """Percentiles of host milliseconds per decode step (schedule + launch + post), over the
        matching engine steps. A multi-step launch of K iterations counts as K decode steps, its
        host time split evenly over them (`per_launch_p50` and `steps_per_launch` say how)."""
        rows = np.asarray(
            [r for r in self.step_log if r[0] >= min_batch and (r[1] or not decode_only)],
            dtype=np.float64,
        ).reshape(-1, 8)
        if not len(rows):
            return {}
        k = rows[:, 7]
        launch = (rows[:, 2] + rows[:, 3] + rows[:, 5]) * 1e3
        host = launch / k
        return {
            "steps": int(k.sum()),
            "launches": len(rows),
            "steps_per_launch": float(k.mean()),
            "p50": float(np.percentile(host, 50)),
            "p90": float(np.percentile(host, 90)),
            "p99": float(np.percentile(host, 99)),
            "per_launch_p50": float(np.median(launch)),
            "schedule_p50": float(np.median(rows[:, 2] / k) * 1e3),
            "prepare_p50": float(np.median(rows[:, 6] / k) * 1e3),
            "launch_p50": float(np.median((rows[:, 3] - rows[:, 6]) / k) * 1e3),
            "post_p50": float(np.median(rows[:, 5] / k) * 1e3),
            "wait_p50": float(np.median(rows[:, 4] / k) * 1e3),
        }
