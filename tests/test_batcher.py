"""core.batcher without a model: which requests share a batch, that each caller gets only its own
rows, and what a cancel or a failure does to the others. `FakeModel` stands in for the batched
generate (one row's answer is its prompt and adapter, one character per step); the real model's
merged answers are checked in tests/test_models.py."""
from __future__ import annotations

import threading

import pytest

from core.batcher import Batcher
from core.generation import GenParams, Generation

SHORT, LONG = GenParams(max_new_tokens=10), GenParams(max_new_tokens=12)  # answers fit both


class FakeModel:
    """A batched generate that records its batches; the first batch can be held (`hold`) until
    the test releases it, so later requests queue behind it deterministically."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.held, self.release = threading.Event(), threading.Event()
        self.step = threading.Event()  # set after every step; tests wait on it to act mid-batch
        self.go_on = threading.Event()
        self.go_on.set()
        if not hold:
            self.release.set()

    def __call__(self, prompts, adapters, params, on_update, stop):
        if "bad" in adapters:
            raise ValueError("unknown adapter 'bad'")
        self.batches.append(list(prompts))
        self.held.set()
        assert self.release.wait(30)
        answers = [f"{p}/{a}" for p, a in zip(prompts, adapters)]
        steps = 0
        for steps in range(1, params.max_new_tokens + 1):
            on_update([a[:steps] for a in answers])
            self.step.set()
            assert self.go_on.wait(30)
            if stop.is_set():
                break
        return [Generation(a[:steps], 1, steps, 0.1, 0.01) for a in answers]


def texts(generations):
    return [g.text for g in generations]


def ask(batcher, prompts, adapters, params=SHORT, cancel=None):
    """Queue now; answer in a thread. Returns (ticket, thread, result dict)."""
    ticket = batcher.submit(prompts, adapters, params)
    out: dict = {"updates": []}

    def wait():
        try:
            out["result"] = batcher.wait(ticket, out["updates"].append, cancel)
        except Exception as err:  # checked by the test
            out["error"] = err

    thread = threading.Thread(target=wait)
    thread.start()
    return ticket, thread, out


def test_requests_queued_behind_a_batch_share_the_next_one_and_see_only_their_rows():
    model = FakeModel(hold=True)
    batcher = Batcher(model, window_s=0.0, max_rows=16)
    *_, first = ask(batcher, ["p0"], ["base"])
    assert model.held.wait(30)
    _, tb, b = ask(batcher, ["p1", "p2"], ["x", "base"])
    _, tc, c = ask(batcher, ["p3"], ["y"])
    assert batcher.queued() == 2
    model.release.set()
    tb.join(30), tc.join(30)
    assert model.batches == [["p0"], ["p1", "p2", "p3"]]
    assert texts(b["result"]) == ["p1/x", "p2/base"] and texts(c["result"]) == ["p3/y"]
    assert all(len(u) == 2 for u in b["updates"]) and b["updates"][-1] == ["p1/x", "p2/base"]
    assert all(len(u) == 1 for u in c["updates"])


def test_only_requests_with_the_same_budget_merge_and_batches_respect_max_rows():
    model = FakeModel(hold=True)
    batcher = Batcher(model, window_s=0.0, max_rows=3)
    *_, first = ask(batcher, ["p0"], ["base"])
    assert model.held.wait(30)
    threads = [ask(batcher, [f"s{i}"], ["base"])[1] for i in range(4)]
    threads.append(ask(batcher, ["l0"], ["base"], LONG)[1])
    threads.append(ask(batcher, ["big1", "big2", "big3", "big4"], ["base"] * 4)[1])
    model.release.set()
    for thread in threads:
        thread.join(30)
    # Oldest first: s0-s2 fill 3 rows, then s3 (the big request would exceed them), then the
    # request with another budget, then the big one alone.
    assert model.batches == [["p0"], ["s0", "s1", "s2"], ["s3"], ["l0"],
                             ["big1", "big2", "big3", "big4"]]


def test_a_request_cancelled_while_queued_never_runs():
    model = FakeModel(hold=True)
    batcher = Batcher(model, window_s=0.0, max_rows=16)
    ask(batcher, ["p0"], ["base"])
    assert model.held.wait(30)
    cancel = threading.Event()
    _, ta, a = ask(batcher, ["gone"], ["base"], cancel=cancel)
    _, tb, b = ask(batcher, ["kept"], ["base"])
    cancel.set()
    ta.join(30)
    assert texts(a["result"]) == [""] and batcher.queued() == 1
    model.release.set()
    tb.join(30)
    assert model.batches == [["p0"], ["kept"]] and texts(b["result"]) == ["kept/base"]


def test_a_request_cancelled_mid_batch_leaves_and_the_others_finish():
    model = FakeModel()
    model.go_on.clear()  # the batch waits after each step until the test lets it go on
    batcher = Batcher(model, window_s=3600.0, max_rows=2)  # the two requests fill one batch
    cancel = threading.Event()
    _, ta, a = ask(batcher, ["aaaa"], ["base"], LONG, cancel=cancel)
    _, tb, b = ask(batcher, ["bbbb"], ["base"], LONG)
    assert model.step.wait(30)
    cancel.set()
    model.go_on.set()
    ta.join(30), tb.join(30)
    assert model.batches == [["aaaa", "bbbb"]]
    assert texts(a["result"]) == ["a"]  # left after the first step with what it had
    assert a["updates"] == [["a"]]
    assert texts(b["result"]) == ["bbbb/base"] == b["updates"][-1]  # unaffected


def test_a_batch_whose_requests_all_cancel_stops():
    model = FakeModel()
    model.go_on.clear()
    batcher = Batcher(model, window_s=0.0, max_rows=16)
    cancel = threading.Event()
    _, ta, a = ask(batcher, ["aaaa"], ["base"], LONG, cancel=cancel)
    assert model.step.wait(30)
    cancel.set()
    model.go_on.set()
    ta.join(30)
    assert a["result"][0].new_tokens < LONG.max_new_tokens  # generate itself stopped early


def test_a_failing_request_fails_alone():
    model = FakeModel(hold=True)
    batcher = Batcher(model, window_s=0.0, max_rows=16)
    ask(batcher, ["p0"], ["base"])
    assert model.held.wait(30)
    _, ta, a = ask(batcher, ["p1"], ["bad"])
    _, tb, b = ask(batcher, ["p2"], ["base"])
    model.release.set()
    ta.join(30), tb.join(30)
    assert "unknown adapter 'bad'" in str(a["error"]) and "result" not in a
    assert texts(b["result"]) == ["p2/base"]


def test_the_window_collects_requests_that_arrive_together():
    model = FakeModel()
    batcher = Batcher(model, window_s=3600.0, max_rows=2)  # only a full batch ends the window
    _, ta, a = ask(batcher, ["p1"], ["base"])
    _, tb, b = ask(batcher, ["p2"], ["base"])
    ta.join(30), tb.join(30)
    assert model.batches == [["p1", "p2"]]


def test_batch_settings_parse_from_the_env():
    from core import config
    assert config.batch_window_ms({}) == 50 and config.batch_window_ms({"BATCH_WINDOW_MS": "0"}) == 0
    assert config.batch_max_rows({}) == 16 and config.batch_max_rows({"BATCH_MAX_ROWS": "4"}) == 4
    for bad in ("-1", "soon", "1e9"):
        with pytest.raises(ValueError, match="BATCH_WINDOW_MS"):
            config.batch_window_ms({"BATCH_WINDOW_MS": bad})
    with pytest.raises(ValueError, match="BATCH_MAX_ROWS"):
        config.batch_max_rows({"BATCH_MAX_ROWS": "0"})
