"""Reaching Ray: the import that names the extra, starting or joining a cluster, and sizing the workers."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import InputError, LorahubError

EXTRA = 'pip install "lorahub-cli[ray]"'
DATA_MODES = ("auto", "object-store", "shared-path")


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray, which is not installed.", f"Install the extra: {EXTRA}") from None
    return ray


@dataclass
class RayOptions:
    address: str = (
        "local"  # local: start a Ray on this machine; auto: join the running cluster; or HOST:PORT, ray://...
    )
    workers: int | None = None  # actors; default one per GPU, else one per node
    data: str = "auto"  # how the driver's registry and model folder reach the workers (see shipping.py)
    max_threads: int | None = None  # torch threads per actor at most (the demo model gains nothing from more)

    def __post_init__(self):
        if self.data not in DATA_MODES:
            raise InputError(
                f"--ray-data '{self.data}' is not one of {', '.join(DATA_MODES)}.", "Example: --ray-data object-store"
            )
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers {self.workers} is not a positive number.", "Example: --workers 2")


@dataclass
class Placement:
    """How many actors, what each asks Ray for, and the torch threads each runs."""

    workers: int
    resources: dict
    threads: int
    nodes: int

    @property
    def ship(self) -> bool:
        return self.nodes > 1


def _check_reachable(address: str) -> None:
    """A HOST:PORT that nothing answers on fails in seconds here; Ray itself would retry for minutes."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise LorahubError(
            f"no Ray cluster answers at '{address}'.",
            "Give the head node's address (`ray start --head` prints it), or --ray alone for a Ray on this machine.",
        ) from None


@contextmanager
def connect(address: str):
    """The Ray module, connected: to the cluster at `address`, to a new local Ray ("local"), or to the one this
    process already joined (tests, notebooks). A Ray started here is shut down on exit."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    # Worker output stays in Ray's session logs: it would tear the driver's progress display.
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address not in ("local", "auto"):
        _check_reachable(address)
    try:
        if address == "local":
            ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise LorahubError(
            f"could not reach a Ray cluster at '{address}': {str(error).splitlines()[0]}",
            "Start one with `ray start --head`, or give --ray alone for a Ray on this machine.",
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def place(ray, options: RayOptions, device: str) -> Placement:
    """One actor per GPU when the cluster has GPUs (and the device allows them), else one per node; on CPU
    the cluster's cores are split evenly between the actors, which run that many torch threads each."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if gpus and not device.startswith("cpu"):
        workers = options.workers or gpus
        threads = max(1, int(cpus // workers))
        return Placement(workers, {"num_gpus": 1, "num_cpus": min(1.0, cpus / workers)}, threads, nodes)
    workers = options.workers or max(1, nodes)
    threads = max(1, int(cpus // workers))
    if options.max_threads:
        threads = min(threads, options.max_threads)
    # More actors than cores share them (fractions) rather than wait for cores that never come.
    return Placement(workers, {"num_cpus": min(float(threads), cpus / workers)}, threads, nodes)
