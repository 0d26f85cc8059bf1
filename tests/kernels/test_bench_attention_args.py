"""scripts/bench_attention.py --decode-configs: the shapes it builds and the errors it names."""

import importlib.util
import pathlib

import pytest

from rtpjax.kernels import ragged_paged_attention_gpu as gpu

SCRIPTS = pathlib.Path(__file__).parents[2] / "scripts"


@pytest.fixture(scope="module")
def bench():
    """The benchmark's helpers module (it holds --decode-configs' parser)."""
    spec = importlib.util.spec_from_file_location(
        "attention_bench_common", SCRIPTS / "attention_bench_common.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decode_configs_per_shape(bench, monkeypatch):
    monkeypatch.setattr(gpu, "_sm_count", lambda: 132)
    configs = bench.decode_configs("default,sm/64/5,2sm/32/3/8,4/16/2")
    at_8x2k = configs(8, 2048)  # 64 programs: 2 per SM at `sm`, 4 at `2sm`
    assert at_8x2k[0] is None
    assert at_8x2k[1] == gpu.GpuConfig(16, 64, 2, 4, 5, 0)
    assert at_8x2k[2] == gpu.GpuConfig(16, 32, 4, 8, 3, 0)
    assert at_8x2k[3] == gpu.GpuConfig(16, 16, 4, 4, 2, 0)
    assert configs(1, 8192)[1].num_splits == 16
    assert configs(256, 512)[1].num_splits == 1  # more programs than SMs: no split
    assert configs(1, 8192)[2].num_splits == 33
    assert bench.decode_configs("4sm/32/3")(1, 8192)[0].num_splits == gpu.MAX_SPLITS  # 66 capped


@pytest.mark.parametrize("spec", ["2/16", "x/64/5", "sm/64/five", "default,1/64/3/4/9"])
def test_decode_configs_names_the_bad_item(bench, spec):
    with pytest.raises(ValueError, match="--decode-configs"):
        bench.decode_configs(spec)
