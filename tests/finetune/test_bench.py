"""scripts/bench_finetune.py runs (a one-layer tiny model on CPU) and returns its rows."""

import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).parents[2] / "scripts" / "bench_finetune.py"


def test_training_benchmark_rows():
    spec = importlib.util.spec_from_file_location("bench_finetune", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.training_benchmark(
        adapters=(2,), model="tiny", layers=1, seq=16, steps=1, warmup=1, dtype="float32"
    )
    assert [(r["mode"], r["adapters"]) for r in rows] == [("sequential", 2), ("concurrent", 2)]
    assert all(r["tokens_per_s"] > 0 and r["layers"] == 1 for r in rows)
    assert rows[1]["speedup"] == rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
