"""Training data: JSONL records, chat-template rendering with the loss mask, grain streams
(deterministic shuffling, epochs, packing, resumable position), batches, synthetic tasks."""

import json

import numpy as np
import pytest

from rtpjax.finetune.batching import build_batch
from rtpjax.finetune.config import DatasetConfig, SyntheticConfig, TaskConfig
from rtpjax.finetune.data import ByteTokenizer, TaskStream, load_dataset, read_jsonl, render
from rtpjax.finetune.tasks import TASKS, make_examples, make_split
from rtpjax.tokenizer import Tokenizer

CHAT = [
    {"role": "user", "content": "k q m"},
    {"role": "assistant", "content": "m q k"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "ok"},
]


@pytest.fixture(scope="module")
def smol(fixtures_dir):
    return Tokenizer.from_pretrained(fixtures_dir / "tokenizer" / "smollm2")


def test_mask_covers_every_answer_and_its_end_of_turn(smol):
    r = render(CHAT, smol, 200)
    full = smol.apply_chat_template(CHAT, add_generation_prompt=False)
    # Shifted for next-token prediction: inputs[t] predicts targets[t] = inputs[t + 1].
    np.testing.assert_array_equal(r["inputs"][1:], r["targets"][:-1])
    np.testing.assert_array_equal(r["inputs"], full[: len(r["inputs"])])
    trained = smol.convert_ids_to_tokens(r["targets"][r["mask"] > 0])
    assert trained == ["m", "Ġq", "Ġk", "<|im_end|>", "ok", "<|im_end|>"]
    # The newline after the last end-of-turn is not trained on, and nothing of the prompts is.
    assert len(r["inputs"]) == len(full) - 2
    prompt = smol.apply_chat_template(CHAT[:1], add_generation_prompt=True)
    assert r["mask"][: len(prompt) - 1].sum() == 0


def test_truncation_keeps_shapes(smol):
    r = render(CHAT, smol, 8)
    assert len(r["inputs"]) == len(r["targets"]) == len(r["mask"]) == 8


def test_byte_tokenizer_render():
    r = render(CHAT[:2], ByteTokenizer(), 100)
    assert bytes(r["targets"][r["mask"] > 0].tolist()) == b"m q k\x03"


def test_jsonl_formats_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps({"instruction": "Reverse", "input": "a b", "output": "b a"})
        + "\n\n"
        + json.dumps({"messages": CHAT})
        + "\n"
    )
    convs = read_jsonl(str(p), "auto", system="be brief")
    assert convs[0] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Reverse\n\na b"},
        {"role": "assistant", "content": "b a"},
    ]
    assert convs[1][1:] == CHAT
    p.write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: alpaca record needs a string 'output'"):
        read_jsonl(str(p))
    p.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: no assistant message"):
        read_jsonl(str(p), "chat")
    p.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
        '"content": "yo"}]}\n{oops\n'
    )
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        read_jsonl(str(p))


def test_eval_split_is_deterministic_and_disjoint(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        "".join(json.dumps({"instruction": f"i{i}", "output": "o"}) + "\n" for i in range(50))
    )
    ds = DatasetConfig(path="d.jsonl", eval_fraction=0.2)
    resolve = lambda x: str(tmp_path / x)
    train, held = load_dataset(ds, resolve, seed=3)
    assert (len(train), len(held)) == (40, 10)
    assert load_dataset(ds, resolve, seed=3) == (train, held)
    key = lambda c: c[0]["content"]
    assert not {key(c) for c in train} & {key(c) for c in held}


def _task(**kw) -> TaskConfig:
    return TaskConfig(
        **{"name": "t", "adapter": "a", "dataset": "d", "batch_size": 4, "max_length": 64, **kw}
    )


def _convs(n=10):
    return [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        for i in range(n)
    ]


def _key(row) -> bytes:
    return bytes(row["inputs"].tolist())


def test_stream_epochs_shuffle_and_resume():
    tok = ByteTokenizer()
    stream = TaskStream(_convs(), tok, _task(epochs=2), seed=0)
    rows = stream.take(100)
    assert len(rows) == 20 and stream.exhausted
    first, second = [_key(r) for r in rows[:10]], [_key(r) for r in rows[10:]]
    assert sorted(first) == sorted(second)  # each epoch sees every example once
    assert first != second  # and in a new order
    assert first != sorted(first)  # shuffled
    again = TaskStream(_convs(), tok, _task(epochs=2), seed=0).take(100)
    assert [_key(r) for r in again] == first + second  # deterministic
    other = TaskStream(_convs(), tok, _task(epochs=2, shuffle_seed=1), seed=0).take(10)
    assert [_key(r) for r in other] != first
    # Resuming from a saved position gives the same rest.
    s = TaskStream(_convs(), tok, _task(epochs=2), seed=0)
    s.take(7)
    state = s.get_state()
    rest = [_key(r) for r in s.take(100)]
    t = TaskStream(_convs(), tok, _task(epochs=2), seed=0)
    t.set_state(state)
    assert [_key(r) for r in t.take(100)] == rest


def test_packing_rows():
    tok = ByteTokenizer()
    stream = TaskStream(_convs(30), tok, _task(packing=True, max_length=40), seed=0)
    rows = stream.take(1000)
    singles = sum(int(render(c, tok, 40)["mask"].sum()) for c in _convs(30))
    assert sum(int(r["mask"].sum()) for r in rows) == singles  # nothing lost or repeated
    for r in rows:
        assert len(r["inputs"]) == 40
        seg, pos = r["segments"], r["positions"]
        assert seg.max() >= 2  # several examples per row
        for s in range(1, seg.max() + 1):
            np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
        assert (r["mask"][seg == 0] == 0).all()
    assert stream.count_rows() == len(rows)


def test_build_batch_layout():
    tok = ByteTokenizer()
    rows = TaskStream(_convs(5), tok, _task(), seed=0).take(5)
    batch = build_batch([(2, rows[:3], 30.0), (0, rows[3:], 12.0)])
    assert batch.tokens.shape[0] == 8 and batch.tokens.shape[1] >= 16  # power-of-two buckets
    np.testing.assert_array_equal(batch.row_slot, [0, 0, 2, 2, 2, -1, -1, -1])  # sorted by slot
    n = len(rows[3]["inputs"])
    np.testing.assert_allclose(batch.weights[0, :n], rows[3]["mask"] / 12.0)
    assert batch.weights[5:].sum() == 0 and batch.segments[5:].sum() == 0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_synthetic_tasks(task):
    ex = make_examples(task, 50, seed=4)
    assert ex == make_examples(task, 50, seed=4)
    for e in ex:
        user, answer = e["messages"][0]["content"], e["messages"][1]["content"]
        letters = user.split()
        assert 4 <= len(letters) <= 6
        assert answer.split() == TASKS[task](letters)
    train, held = make_split(task, 200, 20, seed=4)
    assert len(held) == 20 and not {e["messages"][0]["content"] for e in held} & {
        e["messages"][0]["content"] for e in train
    }
    # Every task answers the same inputs differently (an adapter can only do its own task).
    inputs = [e["messages"][0]["content"] for e in ex]
    assert inputs == [e["messages"][0]["content"] for e in make_examples("upper", 50, seed=4)]


def test_synthetic_dataset_config():
    ds = DatasetConfig(synthetic=SyntheticConfig(task="shift", train_examples=30, eval_examples=5))
    train, held = load_dataset(ds, lambda p: p, seed=0)
    assert len(train) == 30 and len(held) == 5
    assert held[0][1]["content"].split() == TASKS["shift"](held[0][0]["content"].split())
