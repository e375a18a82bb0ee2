"""User-facing errors: the CLI prints these as one readable message, never a traceback."""

from __future__ import annotations

from dataclasses import dataclass


class JobError(Exception):
    """A problem the user can fix: bad spec, missing data, unreachable store, ..."""


def _one_line(text: str) -> str:
    """Control characters of user values shown escaped, so every problem stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class Problem:
    """One refusal of a job spec: the field, what is wrong, and how to fix it."""

    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return _one_line(f"  - {self.path}: {self.message}; fix: {self.fix}")


class BadSample(JobError):
    """A sample whose features are corrupt or quarantined (the dataset applies data.on_bad_sample).

    ``known``: the object was quarantined before this process met it (a restarted run).
    """

    def __init__(self, message: str, key: str, *, known: bool) -> None:
        super().__init__(message)
        self.key = key
        self.known = known
