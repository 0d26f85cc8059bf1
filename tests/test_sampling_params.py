"""SamplingParams: vLLM defaults, normalisation, and a clear ValueError for every bad field."""

import dataclasses
import math

import pytest

from rtpjax.sampling_params import SamplingParams

BAD_VALUES = {
    "n": [0, -1, 1.5, True, "2", None],
    "best_of": [0, 1.5, "3"],
    "temperature": [-0.1, math.nan, math.inf, "1", None],
    "top_p": [0.0, -0.5, 1.01, math.nan, None],
    "top_k": [-2, -100, 1.5, "5", None],
    "min_p": [-0.01, 1.01, math.nan],
    "repetition_penalty": [0.0, -1.0, math.inf, math.nan],
    "presence_penalty": [-2.01, 2.01, math.nan],
    "frequency_penalty": [-2.5, 3, math.inf],
    "seed": [1.5, "7", True],
    "stop": [["ok", ""], "", [1, 2], 5],
    "stop_token_ids": [[-1], [1.5], "12", 3],
    "ignore_eos": [1, None, "yes"],
    "max_tokens": [0, -5, 2.5],
    "min_tokens": [-1, 1.5],
    "logprobs": [-1, 21, 2.0],
    "prompt_logprobs": [-1, 21, "3"],
    "skip_special_tokens": [0, None],
    "spaces_between_special_tokens": ["true"],
    "include_stop_str_in_output": [1],
    "detokenize": [None],
    "logit_bias": [{5: 100.5}, {5: -101}, {-1: 1.0}, {"5": 1.0}, {5: math.nan}, [1, 2]],
}


@pytest.mark.parametrize(
    ("field", "value"), [(f, v) for f, values in BAD_VALUES.items() for v in values]
)
def test_bad_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert f"SamplingParams.{field}" in message, message
    assert "\n" not in message


def test_best_of_below_n_and_min_tokens_above_max_tokens_raise():
    with pytest.raises(ValueError, match=r"best_of=2 .*n=3"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match=r"min_tokens=9 .*\[0, 8\]"):
        SamplingParams(max_tokens=8, min_tokens=9)
    SamplingParams(max_tokens=None, min_tokens=10_000)  # no cap without max_tokens


def test_vllm_defaults():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (None, (), (), False)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert not p.include_stop_str_in_output and p.logit_bias is None
    assert not p.is_greedy() and not p.uses_penalties() and not p.uses_top_k_top_p()


def test_good_values_are_accepted_and_normalised():
    p = SamplingParams(
        n=2,
        best_of=4,
        temperature=0,
        top_p=0.5,
        top_k=-1,
        min_p=1,
        repetition_penalty=1.2,
        presence_penalty=-2,
        frequency_penalty=2,
        seed=-(2**70),
        stop="###",
        stop_token_ids=[2, 7],
        max_tokens=None,
        min_tokens=3,
        logprobs=0,
        prompt_logprobs=20,
        logit_bias={3: -100, 9: 100},
    )
    assert p.stop == ("###",) and p.stop_token_ids == (2, 7)
    assert isinstance(p.temperature, float) and isinstance(p.presence_penalty, float)
    assert p.logit_bias == {3: -100.0, 9: 100.0}
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(top_k=0).top_k == 0 and SamplingParams(top_k=50).top_k == 50


def test_is_greedy():
    assert SamplingParams(temperature=0.0).is_greedy()
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy()
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy()
    assert not SamplingParams(temperature=0.7, top_k=-1).is_greedy()
    assert SamplingParams(temperature=0.0, top_p=0.5).uses_top_k_top_p() is False
    assert SamplingParams(top_p=0.9).uses_top_k_top_p()
    assert SamplingParams(repetition_penalty=1.1).uses_penalties()


def test_frozen_replace_revalidates_and_unknown_keyword_is_type_error():
    p = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]
    assert dataclasses.replace(p, top_k=5).top_k == 5
    with pytest.raises(ValueError, match=r"SamplingParams\.top_p"):
        dataclasses.replace(p, top_p=0.0)
    with pytest.raises(TypeError):
        SamplingParams(use_beam_search=True)  # type: ignore[call-arg]
    # The caller's containers are copied, not kept.
    bias = {1: 2.0}
    q = SamplingParams(logit_bias=bias)
    bias[1] = 50.0
    assert q.logit_bias == {1: 2.0}
