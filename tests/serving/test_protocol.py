"""Server settings (flags, YAML) and the protocol layer, without a server or a model."""

from __future__ import annotations

import pathlib

import pytest

from rtpjax.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from rtpjax.sampling_params import SamplingParams
from rtpjax.serving import ServerArgs, parse_args
from rtpjax.serving import protocol as P
from rtpjax.serving.streaming import RequestRun

REPO = pathlib.Path(__file__).resolve().parents[2]


# -- settings -------------------------------------------------------------------------------------


def test_no_flags_gives_the_defaults():
    args = parse_args([])
    assert args == ServerArgs()
    assert (args.model, args.host, args.port) == (None, "127.0.0.1", 8000)


def test_flags_in_vllm_spelling():
    args = parse_args(
        [
            "--model",
            "/m",
            "--tokenizer",
            "/t",
            "--host",
            "0.0.0.0",
            "--port",
            "9000",
            "--served-model-name",
            "a",
            "b",
            "--max-model-len",
            "1024",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "512",
            "--tensor-parallel-size",
            "2",
            "--kv-cache-memory-fraction",
            "0.5",
            "--no-enable-prefix-caching",
            "--api-key",
            "k",
            "--max-waiting-requests",
            "3",
            "--dtype",
            "bfloat16",
            "--seed",
            "5",
            "--log-level",
            "debug",
            "--attention-impl",
            "triton",
        ]
    )
    assert args.attention_impl == "triton"
    assert (args.model, args.tokenizer) == ("/m", "/t")
    assert args.served_model_name == ("a", "b") and args.enable_prefix_caching is False
    assert (args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens) == (1024, 8, 512)
    assert (args.tensor_parallel_size, args.kv_cache_memory_fraction) == (2, 0.5)
    assert (args.api_key, args.max_waiting_requests, args.dtype, args.seed) == (
        "k",
        3,
        "bfloat16",
        5,
    )


@pytest.mark.parametrize("name", ["default.yaml", "llama3-8b-h100.yaml"])
def test_shipped_configs_load(name):
    args = parse_args(["--config", str(REPO / "configs" / "serve" / name)])
    assert isinstance(args, ServerArgs)


def test_attention_impl_is_checked():
    with pytest.raises(ValueError, match="attention_impl='mosaic' must be one of auto, triton"):
        ServerArgs(attention_impl="mosaic")


def test_default_yaml_is_the_defaults():
    assert (
        parse_args(["--config", str(REPO / "configs" / "serve" / "default.yaml")]) == ServerArgs()
    )


def test_yaml_keys_dashed_or_snake_and_flags_win(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("max-num-seqs: 7\nmax_model_len: 300\nserved-model-name: x\nport: 1\n")
    args = parse_args(["--config", str(cfg), "--port", "2"])
    assert (args.max_num_seqs, args.max_model_len, args.port) == (7, 300, 2)
    assert args.served_model_name == ("x",)


def test_yaml_unknown_key_is_one_clear_line(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("max_num_seqs: 7\nmax_num_sequences: 8\n")
    with pytest.raises(
        ValueError, match=r"s\.yaml: unknown key 'max_num_sequences'; allowed: "
    ) as e:
        parse_args(["--config", str(cfg)])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("port: eighty\n", r"port='eighty' must be int"),
        ("enable_prefix_caching: 1\n", r"enable_prefix_caching=1 must be bool"),
        ("max_num_seqs: 0\n", r"max_num_seqs=0 must be >= 1"),
        ("- a\n- b\n", r"must hold a mapping"),
        ("a: [\n", r"not valid YAML"),
    ],
)
def test_yaml_bad_values(tmp_path, text, match):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=match):
        parse_args(["--config", str(cfg)])


def test_compilation_cache_dir_flag():
    assert ServerArgs().compilation_cache_dir == "~/.cache/rtpjax/xla"
    assert parse_args(["--compilation-cache-dir", ""]).compilation_cache_dir == ""
    assert parse_args(["--compilation-cache-dir", "/c"]).compilation_cache_dir == "/c"


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml: config file not found"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


def test_invalid_settings():
    with pytest.raises(ValueError, match=r"port=70000"):
        ServerArgs(port=70000)
    with pytest.raises(ValueError, match=r"kv_cache_memory_fraction=1\.5"):
        ServerArgs(kv_cache_memory_fraction=1.5)


# -- requests → SamplingParams ----------------------------------------------------------------


def _params(req, **kw):
    base = dict(
        max_tokens=req.max_tokens,
        max_tokens_field="max_tokens",
        logprobs=None,
        logprobs_field="logprobs",
        prompt_logprobs=None,
        vocab_size=1000,
    )
    return P.to_sampling_params(req, **{**base, **kw})


def test_request_fields_reach_sampling_params():
    req = P.CompletionRequest(
        prompt="x",
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        top_k=5,
        min_p=0.1,
        stop="END",
        seed=3,
        logit_bias={"12": 2.0},
        n=2,
        ignore_eos=True,
        min_tokens=1,
        best_of=9,
        lora_path="/x",
    )
    sp = _params(req)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (5, 0.5, 0.9, 5, 0.1)
    assert (sp.stop, sp.seed, sp.logit_bias, sp.n) == (("END",), 3, {12: 2.0}, 2)
    assert sp.ignore_eos and sp.min_tokens == 1 and sp.best_of is None  # best_of ignored


def test_openai_defaults():
    sp = _params(P.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]))
    assert sp.temperature == 1.0 and sp.top_p == 1.0 and sp.max_tokens is None


def test_top_k_beyond_the_vocabulary_is_off():
    assert _params(P.CompletionRequest(prompt="x", top_k=10**30)).top_k == 0


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 1000}}, "logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ],
)
def test_invalid_values_name_the_request_field(fields, param):
    with pytest.raises(P.APIError) as e:
        _params(P.CompletionRequest(prompt="x", **fields))
    assert e.value.status == 400 and e.value.param == param
    assert "SamplingParams" not in e.value.message
    body = e.value.body()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param


def test_chat_field_names_in_errors():
    req = P.ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}], max_completion_tokens=0
    )
    with pytest.raises(P.APIError) as e:
        _params(req, max_tokens=0, max_tokens_field="max_completion_tokens")
    assert e.value.param == "max_completion_tokens"
    assert e.value.message.startswith("max_completion_tokens=0")
    with pytest.raises(P.APIError) as e:
        _params(req, max_tokens=5, logprobs=21, logprobs_field="top_logprobs")
    assert e.value.param == "top_logprobs"


def test_error_shapes():
    e = P.APIError(429, "busy", code="queue_full", retry_after=2)
    assert e.body() == {
        "error": {
            "message": "busy",
            "type": "rate_limit_error",
            "param": None,
            "code": "queue_full",
        }
    }
    assert e.headers() == {"Retry-After": "2"}
    assert P.error_body(500, "x")["error"]["type"] == "server_error"


# -- streaming deltas -----------------------------------------------------------------------------


def _out(text: str, n_tokens: int, finish: str | None = None) -> CompletionOutput:
    return CompletionOutput(0, text, list(range(n_tokens)), None, None, finish)


def test_deltas_hold_back_a_possible_stop_string_prefix():
    t = P.DeltaTracker(SamplingParams(stop=["STOP"]))  # holds back 3 characters
    assert t.delta(_out("Hello", 1)) == ("He", 0, 1)
    assert t.delta(_out("Hello S", 2)) == ("ll", 1, 2)
    assert t.delta(_out("Hello ST", 3)) == ("o", 2, 3)
    assert t.delta(_out("Hello ST", 4)) is None  # a token that added no text (partial UTF-8)
    # The engine found the stop string and truncated the text: the rest goes out, the stop never.
    assert t.delta(_out("Hello ", 5, "stop")) == (" ", 3, 5)
    assert t.delta(_out("Hello ", 5, "stop")) is None


def test_deltas_without_stop_strings_are_one_token_each():
    t = P.DeltaTracker(SamplingParams())
    pieces = [t.delta(_out("abc"[: i + 1], i + 1, "length" if i == 2 else None)) for i in range(3)]
    assert pieces == [("a", 0, 1), ("b", 1, 2), ("c", 2, 3)]


def test_deltas_with_logprobs_send_tokens_even_without_text():
    t = P.DeltaTracker(SamplingParams(logprobs=1))
    assert t.delta(_out("", 1)) == ("", 0, 1)  # e.g. half of a UTF-8 character
    t2 = P.DeltaTracker(SamplingParams())
    assert t2.delta(_out("", 1)) is None


def _delta(rid, text, ids, finish=None, stop=None, lps=None):
    o = CompletionOutput(0, text, ids, None, lps, finish, stop)
    return RequestOutput(rid, None, [1], None, [o], finish is not None, RequestMetrics(0.0))


@pytest.mark.parametrize("include", [False, True])
def test_streamed_deltas_join_into_the_engines_cumulative_output(include):
    """A streaming request gets the engine's deltas; RequestRun joins them back. A stop string
    whose first characters went out in an earlier delta is cut from the joined text as the
    engine cuts its cumulative text (before the stop string, or after it when it is kept)."""
    run = RequestRun(None, "r", 1, None)
    run.kind = "delta"
    run.params = SamplingParams(stop=["END"], include_stop_str_in_output=include)
    lp = [{5: -0.1}, {6: -0.2}, {7: -0.3}, {8: -0.4}]
    steps = [
        _delta("r-0", "Hello ", [5], lps=lp[:1]),
        _delta("r-0", "wor", [6], lps=lp[1:2]),
        _delta("r-0", "ld E", [7], lps=lp[2:3]),  # "E" may start the stop string
        _delta("r-0", "ND!", [8], finish="stop", stop="END", lps=lp[3:]),
    ]
    joined = [run._join(d).outputs[0] for d in steps]
    assert [o.text for o in joined[:3]] == ["Hello ", "Hello wor", "Hello world E"]
    last = joined[-1]
    assert last.text == ("Hello world END" if include else "Hello world ")
    assert last.token_ids == [5, 6, 7, 8] and last.logprobs == lp
    assert last.finish_reason == "stop" and last.stop_reason == "END"
