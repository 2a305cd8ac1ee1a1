"""Concurrent requests into shared batches: a bounded queue and one worker thread.

    batcher = Batcher(engine.run, max_batch=32, window=0.01, max_queue=256)
    batcher.start()
    future = batcher.submit(request)      # QueueFull when max_queue requests already wait
    answer = future.result()
    batcher.close()                       # stop accepting, answer everything accepted, stop

The worker takes the first waiting request, then keeps collecting for at most `window`
seconds or until `max_batch` requests, and runs them as one call, so requests that
arrive together share forward passes. While a batch runs, new requests wait in the
queue and fill the next batch without waiting for the window. A request accepted by
`submit` is always answered (or failed with the batch's error), even during `close`;
`abandon` fails every one still open with `ShuttingDown` (a shutdown deadline).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from ..errors import LorahubError

_STOP = object()


class QueueFull(LorahubError):
    """Too many requests wait already; the client should retry later."""


class ShuttingDown(LorahubError):
    """The server no longer accepts requests."""


@dataclass
class Stats:
    batches: int = 0
    requests: int = 0
    largest_batch: int = 0
    busy_seconds: float = 0.0


class Batcher:
    def __init__(self, run: Callable[[list], list], *, max_batch: int = 32, window: float = 0.01, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1 or window < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and window >= 0")
        self.run, self.max_batch, self.window = run, max_batch, window
        self.stats = Stats()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()  # orders submits before the stop marker
        self._accepting = False
        self._running: list[Future] = []  # the batch the worker holds
        self._thread = threading.Thread(target=self._work, name="lorahub-batcher", daemon=True)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self) -> Batcher:
        self._accepting = True
        self._thread.start()
        return self

    def submit(self, request) -> Future:
        future: Future = Future()
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down.", "Retry against another instance.")
            try:
                self._queue.put_nowait((request, future))
            except queue.Full:
                raise QueueFull(f"{self._queue.maxsize} requests are already waiting.", "Retry in a moment.") from None
        return future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, answer every accepted one, then stop the worker."""
        with self._lock:
            if not self._accepting:
                return
            self._accepting = False
        self._queue.put(_STOP)  # after every accepted request, since submits are refused from here on
        self._thread.join(timeout)

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def abandon(self) -> int:
        """Refuse new requests and fail every accepted one not yet answered with ShuttingDown; how many."""
        self.stop_accepting()
        open_ = list(self._running)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                open_.append(item[1])
        failed = 0
        for future in open_:
            failed += _settle(future, error=ShuttingDown("the server is shutting down and this request did not finish "
                                                          "in time.", "Retry against another instance."))
        return failed

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                try:
                    # Requests queued during the previous batch are taken at once; new ones within the window.
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._answer(batch)

    def _answer(self, batch: list) -> None:
        requests, futures = [r for r, _ in batch], [f for _, f in batch]
        self._running = futures
        start = time.perf_counter()
        try:
            answers = self.run(requests)
        except BaseException as error:  # noqa: BLE001 - every accepted request must hear back
            for future in futures:
                _settle(future, error=error)
        else:
            for future, answer in zip(futures, answers):
                _settle(future, answer)
        self._running = []
        s = self.stats
        s.batches, s.requests = s.batches + 1, s.requests + len(batch)
        s.largest_batch, s.busy_seconds = max(s.largest_batch, len(batch)), s.busy_seconds + time.perf_counter() - start


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
