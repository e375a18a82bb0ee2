"""User-facing errors: the CLI prints these as one readable message, never a traceback."""


class JobError(Exception):
    """A problem the user can fix: bad spec, missing data, unreachable store, ..."""
