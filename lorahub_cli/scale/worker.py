"""The actor side: what every worker does before its first job."""

from __future__ import annotations

import os
import socket


class Worker:
    """Sets torch's threads, then `prepare()` (materialise data, load the model) once, in `setup()`."""

    def __init__(self, threads: int):
        self.threads = threads

    def setup(self) -> dict:
        import torch

        torch.set_num_threads(self.threads)
        self.prepare()
        return {"host": socket.gethostname(), "pid": os.getpid(), "threads": self.threads}

    def prepare(self) -> None:
        raise NotImplementedError
