"""The dispatcher on its own (no model): admission under slots and a memory budget, first-in
first-out, retirement starting the next task while the others run, and its saved state."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtpjax.finetune.dispatcher import Dispatcher


def make(sizes: dict[str, int], slots: int = 2, budget: int | None = 100) -> Dispatcher:
    return Dispatcher(slots, budget, sizes.__getitem__, queue=list(sizes))


def test_admits_while_it_fits_then_starts_the_next_on_retire():
    d = make({"a": 40, "b": 50, "c": 30, "d": 10}, slots=3)
    assert d.admit() == [("a", 0), ("b", 1)]  # c would make 120 > 100
    assert d.admit() == []
    assert d.retire("a") == 0
    assert d.admit() == [("c", 0), ("d", 2)]  # a's slot is reused; b keeps running in slot 1
    assert d.running == {"b": 1, "c": 0, "d": 2}
    for name in ("b", "c", "d"):
        d.retire(name)
    assert d.done and d.finished == ["a", "b", "c", "d"]


def test_head_of_queue_is_not_overtaken():
    d = make({"a": 60, "big": 50, "small": 1})
    assert d.admit() == [("a", 0)]
    assert d.admit() == []  # `small` fits but waits behind `big`
    d.retire("a")
    assert d.admit() == [("big", 0), ("small", 1)]


def test_slots_limit_without_budget():
    d = make({n: 10**12 for n in "abc"}, slots=2, budget=None)
    assert [n for n, _ in d.admit()] == ["a", "b"]


def test_task_too_large_alone_is_refused_up_front():
    with pytest.raises(ValueError, match=r"task 'huge' needs about .* MiB, more than .* budget"):
        make({"a": 1, "huge": 200})


def test_retire_unknown_and_resubmit():
    d = make({"a": 1})
    with pytest.raises(ValueError, match="task 'a' is not running"):
        d.retire("a")
    with pytest.raises(ValueError, match="already submitted"):
        d.submit("a")


def test_state_roundtrip():
    sizes = {"a": 40, "b": 50, "c": 30}
    d = make(sizes)
    d.admit()
    d.retire("a")
    e = make(sizes)
    e.load_state_dict(d.state_dict())
    assert e.admit() == d.admit() == [("c", 0)]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 100), min_size=1, max_size=12),
    slots=st.integers(1, 4),
    retire_order=st.randoms(use_true_random=False),
)
def test_invariants(sizes, slots, retire_order):
    names = [f"t{i}" for i in range(len(sizes))]
    table = dict(zip(names, sizes))
    d = Dispatcher(slots, 100, table.__getitem__, queue=list(names))
    started = []
    while not d.done:
        started += [n for n, _ in d.admit()]
        # Never more than the slots or the budget; slots never shared.
        assert len(d.running) <= slots
        assert len(set(d.running.values())) == len(d.running)
        assert sum(table[n] for n in d.running) <= 100
        assert d.running, "a task that fits alone must always be admitted eventually"
        d.retire(retire_order.choice(sorted(d.running)))
    assert started == names  # first in, first started
