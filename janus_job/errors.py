"""User-facing errors: the CLI prints these as one readable message, never a traceback."""

from __future__ import annotations

from dataclasses import dataclass


class JobError(Exception):
    """A problem the user can fix: bad spec, missing data, unreachable store, ..."""


@dataclass(frozen=True)
class Problem:
    """One refusal of a job spec: the field, what is wrong, and how to fix it."""

    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"  - {self.path}: {self.message}\n    fix: {self.fix}"
