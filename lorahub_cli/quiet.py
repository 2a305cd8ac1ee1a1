"""Silencing the progress bars and notices that libraries print on their own; lorahub draws its own."""

from __future__ import annotations

import warnings
from contextlib import contextmanager


@contextmanager
def no_progress(description: str, total: int | None):
    """A progress factory that draws nothing (for callers without a screen, or with --json)."""
    yield lambda *args, **kwargs: None


@contextmanager
def quiet_loading():
    """transformers draws a weight-loading bar on stderr for every model it loads."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


@contextmanager
def quiet_optimizer():
    """scipy's COBYLA warns about nevergrad's RHOEND setting at every start (the setting is intended) and
    about budgets below N + 2 (the search still stops at the budget); the cma package warns about
    matplotlib, which only its plotting needs; nevergrad about the +inf we tell for a non-finite loss."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="COBYLA: Invalid (RHOEND|MAXFUN)", category=UserWarning)
        warnings.filterwarnings("ignore", message="Could not import matplotlib", category=UserWarning)
        # A non-finite loss is told as +inf on purpose and counted in the result's `nonfinite`.
        warnings.filterwarnings("ignore", message="Clipping very high value")
        yield
