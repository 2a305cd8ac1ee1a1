"""The user-facing error type: every expected failure becomes one of these.

The CLI turns a LorahubError into a one-line message plus a hint and a non-zero
exit; anything else is a bug and shows a traceback only with LORAHUB_DEBUG=1.
"""

from __future__ import annotations


class LorahubError(Exception):
    """An error the user can fix. `hint` says how (a command, a flag, a value)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class InputError(LorahubError):
    """A malformed file or value given by the user."""

    exit_code = 2


class NotFoundError(LorahubError):
    """An adapter, repo, card or file that does not exist."""


class HubError(LorahubError):
    """The Hub could not be reached or refused a request."""


class HubUnreachableError(HubError):
    """No connection to the Hub at all (as opposed to a refused request): retrying other repos is pointless."""


class IntegrityError(LorahubError):
    """Stored content does not match its recorded hash."""
