"""rtpjax's XLA defaults (env.configure_xla) and the device-memory query the KV planner uses."""

import jax
import pytest

from rtpjax import env

FLAG = "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
LOOPS = "--xla_gpu_enable_command_buffer=+WHILE"


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RTPJAX_STABLE_GRAPHS", "XLA_PYTHON_CLIENT_PREALLOCATE", "RTPJAX_LOOP_GRAPHS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    return monkeypatch


def test_stable_graphs_off_and_loop_graphs_on_by_default(clean_env):
    import os

    assert not env.stable_graphs() and env.loop_graphs()
    assert env.configure_xla()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {LOOPS}"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ
    assert not env.configure_xla(), "a second call must not add the flag twice"
    assert os.environ["XLA_FLAGS"].count("xla_gpu_enable_command_buffer") == 1


def test_loop_graphs_off_and_user_command_buffer_flag_wins(clean_env):
    import os

    clean_env.setenv("RTPJAX_LOOP_GRAPHS", "0")
    assert not env.loop_graphs() and not env.configure_xla()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    clean_env.setenv("RTPJAX_LOOP_GRAPHS", "1")
    clean_env.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")
    assert not env.configure_xla()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_command_buffer="


def test_sets_skip_temp_and_no_preallocation(clean_env):
    import os

    clean_env.setenv("RTPJAX_STABLE_GRAPHS", "1")
    clean_env.setenv("RTPJAX_LOOP_GRAPHS", "0")
    assert env.configure_xla()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert not env.configure_xla(), "a second call must not add the flag twice"
    assert os.environ["XLA_FLAGS"].count("command_buffer_update_mode") == 1


@pytest.mark.parametrize(
    "var, value",
    [
        ("XLA_PYTHON_CLIENT_PREALLOCATE", "true"),
        ("XLA_FLAGS", "--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE"),
    ],
)
def test_user_settings_win(clean_env, var, value):
    import os

    clean_env.setenv("RTPJAX_STABLE_GRAPHS", "1")
    clean_env.setenv("RTPJAX_LOOP_GRAPHS", "0")
    clean_env.setenv(var, value)
    before = os.environ.get("XLA_FLAGS")
    assert not env.configure_xla()
    assert os.environ.get("XLA_FLAGS") == before
    assert FLAG not in os.environ["XLA_FLAGS"]


def test_stable_graphs_switch(clean_env):
    clean_env.setenv("RTPJAX_STABLE_GRAPHS", "1")
    assert env.stable_graphs()
    clean_env.setenv("RTPJAX_STABLE_GRAPHS", "0")
    assert not env.stable_graphs()


def test_device_memory_unknown_on_cpu_and_jax_started():
    dev = jax.devices()[0]
    assert env.jax_started()
    assert env.device_memory(dev) is None  # CPU keeps no statistics: the planner's CPU branch
