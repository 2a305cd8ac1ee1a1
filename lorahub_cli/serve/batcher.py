"""Concurrent requests into shared batches: a bounded queue and one worker thread.

    batcher = Batcher(engine.run, max_batch=32, window=0.01, max_queue=256, size=lambda r: len(r.input))
    batcher = Batcher(session=engine.session, max_batch=32, ...)      # continuous batching instead
    batcher.start()
    future = batcher.submit(request)      # QueueFull when max_queue requests already wait
    answer = future.result()
    batcher.close()                       # stop accepting, answer everything accepted, stop

Static batches (`run`): the worker takes the first waiting request, then keeps collecting
for at most `window` seconds or until `max_batch` requests, and runs them as one call, so
requests that arrive together share forward passes. While a batch runs, new requests wait
and fill the next batch without waiting for the window.

Continuous batching (`session`, a factory of `Stepper`s such as `engine.Session`): the worker drives the
session one decoding step at a time. Before each step, waiting requests move into the session
while it holds fewer than 2 x `max_batch` (running or waiting there; an idle worker first
collects for `window`), so that the session's own admission (`decoding.Admission`) sees up to
a batch of candidates and gathers joins into groups of similar length; a request is answered
at the step that finishes it, and `submit(request, on_token)` hears of each of its tokens as
it is decoded.

Length buckets: when more than `max_batch` requests wait, the batch is the oldest
waiting request and the `max_batch - 1` others nearest to it in `size` (input length),
so a batch pads its inputs to a length near their own instead of to the longest of
whatever arrived. The oldest always goes next, so no request waits more than
(waiting / max_batch) batches.

A request accepted by `submit` is always answered (or failed with the batch's error),
even during `close`; `abandon` fails every one still open with `ShuttingDown` (a
shutdown deadline).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Protocol

from ..errors import LorahubError
from ..settings import SERVE


class QueueFull(LorahubError):
    """Too many requests wait already; the client should retry later."""


class ShuttingDown(LorahubError):
    """The server no longer accepts requests."""


class Stepper(Protocol):
    """What continuous batching steps (`engine.Session`; the tests hold doubles): requests join with `add`, and
    each `step` decodes one token for every running row and returns the (key, answer) pairs that finished (None
    for a cancelled one). Only the worker thread uses it."""

    @property
    def running(self) -> int:
        """Rows decoding now."""
        raise NotImplementedError

    @property
    def load(self) -> int:
        """Rows decoding or waiting inside the stepper."""
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        """Whether a step has work."""
        raise NotImplementedError

    @property
    def prefills(self) -> int:
        """Prefill passes run so far (groups of requests that joined at one step)."""
        raise NotImplementedError

    def add(self, requests: list, keys: list, on_token: list | None = None, cancelled: list | None = None) -> None:
        """Queue checked requests under `keys`; `on_token[i](token, logprob, answer or None)` as each token is
        decoded; `cancelled[i]()` true: request i leaves at the next step."""
        raise NotImplementedError

    def step(self) -> list[tuple[object, object]]:
        """One decoding step; the requests that finished at it, by key."""
        raise NotImplementedError

    def abandon(self) -> list:
        """Drop every request; their keys."""
        raise NotImplementedError


@dataclass
class Stats:
    batches: int = 0  # static: batches run; continuous: prefill passes (groups of requests that joined at one step)
    requests: int = 0
    largest_batch: int = 0  # the most rows decoded together
    busy_seconds: float = 0.0
    steps: int = 0  # continuous: decoding steps


class Batcher:
    def __init__(
        self,
        run: Callable[[list], list] | None = None,
        *,
        session: Callable[[], Stepper] | None = None,
        max_batch: int = SERVE["batch_size"],
        window: float = SERVE["batch_window_ms"] / 1000,
        max_queue: int = SERVE["max_queue"],
        size: Callable[[object], int] | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or window < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and window >= 0")
        if (run is None) == (session is None):
            raise ValueError("give run (static batches) or session (continuous batching)")
        self.run, self.session, self.max_batch, self.window, self.max_queue = run, session, max_batch, window, max_queue
        self.size = size or (lambda request: 0)
        self.stats = Stats()
        self._waiting: list[
            tuple[object, Future, int, Callable | None]
        ] = []  # (request, future, size, on_token), oldest first
        self._cond = threading.Condition()  # guards _waiting, _accepting, _stopping
        self._accepting = self._stopping = False
        self._running: set[Future] = set()  # the requests the worker holds
        work = self._work if session is None else self._work_steps
        self._thread = threading.Thread(target=work, name="lorahub-batcher", daemon=True)

    @property
    def continuous(self) -> bool:
        return self.session is not None

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self) -> Batcher:
        self._accepting = True
        self._thread.start()
        return self

    def submit(self, request, on_token: Callable | None = None) -> Future:
        """Queue a request; its future's result is the answer. `on_token(token, logprob, answer or None)` is
        called from the worker thread as each token is decoded (continuous batching only)."""
        future: Future = Future()
        size = self.size(request)
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down.", "Retry against another instance.")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting.", "Retry in a moment.")
            self._waiting.append((request, future, size, on_token))
            self._cond.notify()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, answer every accepted one, then stop the worker."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def abandon(self) -> int:
        """Refuse new requests and fail every accepted one not yet answered with ShuttingDown; how many."""
        with self._cond:
            self._accepting = False
            open_ = [item[1] for item in self._waiting] + list(self._running)
            self._waiting = []
        error = ShuttingDown(
            "the server is shutting down and this request did not finish in time.", "Retry against another instance."
        )
        return sum(_settle(future, error=error) for future in open_)

    def _next_batch(self) -> list | None:
        """Wait for requests and pick the next batch (see the module docstring); None when stopped and empty."""
        with self._cond:
            while not self._waiting:
                if self._stopping:
                    return None
                self._cond.wait()
            self._collect()
            return self._take(self.max_batch)

    def _collect(self) -> None:
        """With the lock held and a request waiting: wait up to `window` for up to max_batch of them."""
        deadline = time.monotonic() + self.window
        while len(self._waiting) < self.max_batch and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)

    def _take(self, n: int) -> list:
        """With the lock held: the oldest waiting request and its n - 1 nearest in size, removed from the queue."""
        from ..decoding import nearest

        waiting = self._waiting
        chosen = set(nearest([item[2] for item in waiting], n))
        self._waiting = [item for i, item in enumerate(waiting) if i not in chosen]
        return [item for i, item in enumerate(waiting) if i in chosen]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._answer(batch)

    def _answer(self, batch: list) -> None:
        requests, futures = [item[0] for item in batch], [item[1] for item in batch]
        self._running = set(futures)
        start = time.perf_counter()
        try:
            answers = self.run(requests)
        except BaseException as error:  # noqa: BLE001 - every accepted request must hear back
            for future in futures:
                _settle(future, error=error)
        else:
            for future, answer in zip(futures, answers):
                _settle(future, answer)
        self._running = set()
        s = self.stats
        s.batches, s.requests = s.batches + 1, s.requests + len(batch)
        s.largest_batch, s.busy_seconds = max(s.largest_batch, len(batch)), s.busy_seconds + time.perf_counter() - start

    def _work_steps(self) -> None:
        session = self.session()
        while True:
            with self._cond:
                while not self._waiting and not session.busy:
                    if self._stopping:
                        return
                    self._cond.wait()
                if self._waiting and not session.busy:
                    self._collect()
                room = 2 * self.max_batch - session.load
                joining = self._take(room) if room > 0 and self._waiting else []
            start = time.perf_counter()
            if joining:
                futures = [item[1] for item in joining]
                with self._cond:  # abandon() reads _running from another thread
                    self._running.update(futures)
                try:
                    # A future cancelled (a stream whose client left) takes its row out at the next step.
                    session.add(
                        [item[0] for item in joining],
                        keys=futures,
                        on_token=[item[3] for item in joining],
                        cancelled=[future.cancelled for future in futures],
                    )
                except BaseException as error:  # noqa: BLE001 - every accepted request must hear back
                    self._release(futures, error=error)
                    continue
                self.stats.requests += len(joining)
            prefills = session.prefills
            try:
                finished = session.step()
            except BaseException as error:  # noqa: BLE001 - a failed step fails the requests it held
                self._release(session.abandon(), error=error)
                session = self.session()
                continue
            s = self.stats
            s.steps, s.largest_batch = s.steps + 1, max(s.largest_batch, session.running + len(finished))
            s.batches += session.prefills - prefills
            self._release([future for future, _ in finished], [answer for _, answer in finished])
            s.busy_seconds += time.perf_counter() - start

    def _release(self, futures: list, answers: list | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            self._running.difference_update(futures)
        for i, future in enumerate(futures):
            _settle(future, None if answers is None else answers[i], error)


def _settle(future: Future, result=None, error: BaseException | None = None) -> bool:
    """Answer a future unless it was answered already (abandoned at a shutdown deadline); whether it was."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
        return True
    except InvalidStateError:
        return False
