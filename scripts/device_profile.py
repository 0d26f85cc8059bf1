"""Device time per GPU kernel, read from a jax.profiler trace: what a call costs the GPU itself,
without the host's dispatch or an XLA loop's control between calls. Shared by the benchmark
scripts (bench_attention's decode section, bench_lora's profile, bench_decode_profile)."""

from __future__ import annotations

import collections
import glob
import os
import tempfile
from collections.abc import Callable

import jax


def kernel_times(
    fn: Callable[[int], object], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """(µs per call, launches per call) of every GPU kernel while fn(i) runs for i in
    range(repeats); fn's results are waited for before the trace closes."""
    from jax.profiler import ProfileData

    d = tempfile.mkdtemp(prefix="rtpjax_prof_")
    with jax.profiler.trace(d):
        outs = [fn(i) for i in range(repeats)]
        jax.block_until_ready(outs)
        jax.effects_barrier()
    us: dict[str, float] = collections.Counter()
    count: dict[str, float] = collections.Counter()
    for path in glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if not line.name.startswith("Stream"):
                    continue
                for ev in line.events:
                    us[ev.name] += ev.duration_ns / 1e3 / repeats
                    count[ev.name] += 1 / repeats
    return dict(us), dict(count)
