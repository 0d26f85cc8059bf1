"""`random:<preset>` models: preset shapes, random weights, the default tokenizer's vocabulary."""

import pytest

from rtpjax import LLM, SamplingParams
from rtpjax.weights.checkpoint import load_model


def test_random_preset_takes_the_tokenizers_vocabulary_and_generates_decodable_text():
    m = load_model("random:tiny")
    assert m.config.vocab_size == m.tokenizer.vocab_size == 49152
    assert set(m.config.eos_token_ids) == set(m.tokenizer.eos_token_ids)
    assert m.params.embed.shape == (49152, m.config.hidden_size)
    llm = LLM(m, max_model_len=64, max_num_seqs=2, progress=False)
    out = llm.generate(["Hello"], SamplingParams(max_tokens=6, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 6
    assert out.text == m.tokenizer.decode(out.token_ids)


def test_unknown_random_preset_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown preset 'nope'.*llama3-8b"):
        load_model("random:nope")
