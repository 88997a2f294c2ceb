"""megalite's error classes: what went wrong decides the exit status, not where it was raised.

- `UserError` (exit 2): bad flags, config files, layouts, checkpoints or data. Every rank sees
  the same input, so every rank raises the same message and rank 0 alone needs to print it.
- anything else (exit 1): a bug or a failure of the machine (a peer died, a collective timed
  out); each rank prints its own, with the traceback.

This module imports nothing, so every layer (parallel_state included) may raise these.
"""


class MegaliteError(Exception):
    """Base of megalite's own errors."""


class UserError(MegaliteError):
    """Input that cannot work: the message names the flag, file, rank or numbers. Exit 2."""


class InternalError(MegaliteError):
    """A broken invariant inside megalite (a bug): exit 1 with the traceback."""
