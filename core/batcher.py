"""Visitors batched together: requests for one model that arrive while a batch is forming (a short
window) or while one is running are answered as rows of the next batch, instead of one whole
generation after another behind the model's lock. No Gradio, no model code: the batch itself is
one call of the `run` function the hub gives (ModelHub._run, one batched generate).

Which requests merge: the hub sends only greedy ones, and a batch takes only requests with the
same max_new_tokens as its oldest, so every row decodes as it would alone (greedy answers do not
depend on the other rows of a batch: tests/test_models.py) and no request waits for a longer
budget than its own. Sampled requests draw from one seeded generator that other rows would shift,
so the hub runs them alone, as it does requests that reuse a cached prompt prefix.

Each request sees only its own rows, streamed as they grow. A request cancelled while queued
leaves the queue and never runs; one cancelled mid-batch stops receiving its rows and returns at
the batch's next step with the texts it had (its rows go on unseen), while the others go on; a
batch whose every request is cancelled stops at its next step, and each request then gets its
cut rows as generate returned them. A batch that fails is run again one request at a time, so a
visitor's bad adapter fails only that visitor.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from core.generation import GenParams, Generation, Prompt
from core.testhooks import gate

logger = logging.getLogger(__name__)

OnUpdate = Callable[[list[str]], None]
RunBatch = Callable[[list[Prompt], list[str], GenParams, OnUpdate, threading.Event], list[Generation]]

# How often a waiting caller looks at its cancel event while its request is queued.
_CANCEL_POLL_S = 0.1


class Ticket:
    """One caller's request, from Batcher.submit until Batcher.wait returns its rows."""

    def __init__(self, prompts: list[Prompt], adapters: list[str], params: GenParams) -> None:
        self.prompts, self.adapters, self.params = prompts, adapters, params
        self.arrived = time.monotonic()
        self.on_update: OnUpdate | None = None
        self.cancel: threading.Event | None = None
        self.texts = [""] * len(prompts)  # the latest streamed texts of its rows
        self._lock = threading.Lock()  # orders attach() against update()
        self._done = threading.Event()
        self._result: list[Generation] | None = None
        self._error: BaseException | None = None

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def key(self) -> tuple:
        """Requests with equal keys decode alike: greedy ones need only the same token budget."""
        p = self.params
        return (p.max_new_tokens,) if p.temperature == 0 else (p.max_new_tokens, p.temperature,
                                                               p.top_p, p.seed)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def attach(self, on_update: OnUpdate | None, cancel: threading.Event | None) -> None:
        """The waiting caller's callback and cancel event; it gets the rows streamed so far."""
        with self._lock:
            self.on_update, self.cancel = on_update, cancel
            if on_update is not None and any(self.texts):
                on_update(self.texts)

    def update(self, texts: list[str]) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.texts = texts
            if self.on_update is not None:
                self.on_update(texts)

    def finish(self, result: list[Generation] | None = None, error: BaseException | None = None) -> None:
        """The first answer wins: a request cut short keeps the texts it returned with."""
        if not self._done.is_set():
            self._result, self._error = result, error
            self._done.set()

    def cut(self) -> list[Generation]:
        """The rows as this request last saw them (no token counts: it left before they ended)."""
        return [Generation(text, 0, 0, 0.0, 0.0) for text in self.texts]


class Batcher:
    """Merges the queued requests of one model into batches, run one at a time by a worker thread
    that exists while requests are queued or running."""

    def __init__(self, run: RunBatch, window_s: float, max_rows: int, name: str = "") -> None:
        self._run, self._window_s, self._max_rows, self._name = run, window_s, max_rows, name
        self._cond = threading.Condition()
        self._queue: list[Ticket] = []
        self._working = False

    def submit(self, prompts: list[Prompt], adapters: list[str], params: GenParams) -> Ticket:
        """Queue a request now (in the caller's thread, so requests keep their order); answer it
        with wait()."""
        ticket = Ticket(list(prompts), list(adapters), params)
        with self._cond:
            self._queue.append(ticket)
            if not self._working:
                self._working = True
                threading.Thread(target=self._work, daemon=True, name=f"batcher {self._name}").start()
            self._cond.notify_all()
        return ticket

    def wait(self, ticket: Ticket, on_update: OnUpdate | None = None,
             cancel: threading.Event | None = None) -> list[Generation]:
        """The ticket's generations; `on_update` gets its rows' growing texts, `cancel` drops it."""
        ticket.attach(on_update, cancel)
        while not ticket._done.wait(_CANCEL_POLL_S):
            if ticket.cancelled():
                self._withdraw(ticket)
        if ticket._error is not None:
            raise ticket._error
        return ticket._result or []

    def queued(self) -> int:
        """Requests waiting for a batch (not the running one)."""
        with self._cond:
            return len(self._queue)

    def _withdraw(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                ticket.finish(ticket.cut())
                self._cond.notify_all()
        # A running ticket is dropped by the batch at its next step (_on_step).

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if not batch:
                    self._working = False
                    return
            self._run_batch(batch)  # answers every ticket of the batch, never raises

    def _next_batch(self) -> list[Ticket]:
        """Wait out the window of the oldest request (unless a batch is full already), then take
        the queued requests that decode like it, oldest first, up to max_rows rows (a larger
        request runs alone). The caller holds the condition."""
        while self._queue:
            first = self._queue[0]
            compatible = sum(t.rows for t in self._queue if t.key == first.key)
            left = first.arrived + self._window_s - time.monotonic()
            if left <= 0 or compatible >= self._max_rows:
                break
            self._cond.wait(left)
        if not self._queue:
            return []
        first, rows, batch = self._queue[0], 0, []
        for ticket in list(self._queue):
            if ticket.key == first.key and (not batch or rows + ticket.rows <= self._max_rows):
                batch.append(ticket)
                rows += ticket.rows
                self._queue.remove(ticket)
        return batch

    def _run_batch(self, batch: list[Ticket]) -> None:
        bounds, start = [], 0
        for ticket in batch:
            bounds.append((ticket, slice(start, start + ticket.rows)))
            start += ticket.rows
        stop = threading.Event()
        logger.info("batch of %d requests, %d rows (%s)", len(batch), start, self._name)
        try:
            gate("batcher-run")  # tests hold a batch here while others queue (core.testhooks)
            generations = self._run([p for t in batch for p in t.prompts],
                                    [a for t in batch for a in t.adapters], batch[0].params,
                                    lambda texts: self._on_step(bounds, stop, texts), stop)
        except BaseException as err:
            if len(batch) == 1:
                batch[0].finish(error=err)
                return
            logger.info("a batch of %d requests failed (%s): running them one at a time", len(batch), err)
            for ticket in batch:
                self._run_batch([ticket])
            return
        for ticket, rows in bounds:
            ticket.finish(generations[rows])

    @staticmethod
    def _on_step(bounds: list[tuple[Ticket, slice]], stop: threading.Event, texts: list[str]) -> None:
        cancelled = [ticket.cancelled() for ticket, _ in bounds]
        if all(cancelled):
            stop.set()  # generate stops after this step and every request gets its cut rows
            return
        for (ticket, rows), gone in zip(bounds, cancelled):
            if gone:
                ticket.finish(ticket.cut())  # its rows go on unseen until the batch ends
            else:
                ticket.update(texts[rows])
