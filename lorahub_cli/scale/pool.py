"""Jobs on a pool of actors that survive lost workers.

Each actor first runs `setup()` (materialise data, load the model), then one job at a time through
`run(payload)`. A job whose actor dies (killed, node gone, out of memory) goes back to the queue and the
actor is replaced; after MAX_ATTEMPTS lost workers it is reported failed (it likely kills its worker).
A job that raises is reported failed at once: its own error would only repeat. Results come back to the
caller, one by one as they finish, so that the driver alone writes them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import LorahubError

MAX_ATTEMPTS = 3


@dataclass
class Outcome:
    job: object
    result: object = None
    error: str | None = None  # set when the job failed


def _lost_errors(ray) -> tuple:
    e = ray.exceptions
    return (e.RayActorError, e.WorkerCrashedError, e.NodeDiedError, e.ObjectLostError)


def describe(error: BaseException) -> str:
    """A job's own error in one line: a lorahub error as its message, anything else with its type."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, LorahubError):
        return str(cause)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".rstrip(": ")


class Pool:
    """`size` actors from `make_actor()`; `status` reports running / retried / failed for a progress line."""

    def __init__(self, ray, make_actor: Callable, size: int, on_event: Callable | None = None):
        self.ray, self.make_actor, self.size = ray, make_actor, size
        self.on_event = on_event or (lambda kind, job, actor: None)
        self.running = self.retried = self.failed = 0
        self._actors: list = []

    def status(self) -> str:
        return f"{self.running} running · {self.retried} retried · {self.failed} failed"

    def _start(self, pending_setup: dict) -> None:
        actor = self.make_actor()
        self._actors.append(actor)
        pending_setup[actor.setup.remote()] = actor

    def run(self, jobs: list, payload: Callable, advance: Callable) -> Iterator[Outcome]:
        ray, lost = self.ray, _lost_errors(self.ray)
        queue, attempts, idle = deque(jobs), {id(job): 0 for job in jobs}, []
        setups, calls = {}, {}  # ref -> actor; ref -> (job, actor)
        starts_left = self.size * (MAX_ATTEMPTS + 1)  # actors that die while starting are replaced this often
        for _ in range(min(self.size, len(jobs))):
            self._start(setups)
            starts_left -= 1
        try:
            while queue or calls:
                while queue and idle:
                    actor, job = idle.pop(), queue.popleft()
                    calls[actor.run.remote(payload(job))] = (job, actor)
                    self.running += 1
                    advance(self.status(), step=0)
                    self.on_event("started", job, actor)
                if not setups and not calls:
                    raise LorahubError(
                        "every Ray worker died while starting.",
                        "See the Ray logs (`ray logs`) and the cluster's memory.",
                    )
                ready, _ = ray.wait(list(setups) + list(calls), num_returns=1)
                ref = ready[0]
                if ref in setups:
                    actor = setups.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(actor)
                    except lost:
                        if starts_left > 0:
                            self._start(setups)
                            starts_left -= 1
                    except ray.exceptions.RayTaskError as error:
                        raise LorahubError(f"a Ray worker could not start: {describe(error)}") from None
                    continue
                job, actor = calls.pop(ref)
                self.running -= 1
                try:
                    result = ray.get(ref)
                except lost:
                    attempts[id(job)] += 1
                    self._start(setups)
                    if attempts[id(job)] < MAX_ATTEMPTS:
                        self.retried += 1
                        queue.appendleft(job)
                        self.on_event("retried", job, actor)
                        advance(self.status(), step=0)
                        continue
                    self.failed += 1
                    self.on_event("failed", job, actor)
                    advance(self.status(), step=0)
                    yield Outcome(job, error=f"lost its worker {MAX_ATTEMPTS} times (out of memory?)")
                    continue
                except ray.exceptions.RayTaskError as error:
                    idle.append(actor)
                    self.failed += 1
                    self.on_event("failed", job, actor)
                    advance(self.status(), step=0)
                    yield Outcome(job, error=describe(error))
                    continue
                idle.append(actor)
                self.on_event("done", job, actor)
                advance(self.status())
                yield Outcome(job, result)
        finally:
            for actor in self._actors:
                ray.kill(actor)
