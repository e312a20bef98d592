"""The exceptions the CLI turns into one line on stderr: bad input (exit 2), a diverged run (exit 3), a
write that failed (exit 5; a full disk, a quota, an I/O error). The stall watchdog exits 4 itself.

Anything else is a bug (exit 1).
"""


class BadInput(ValueError):
    """Bad config, path, data or checkpoint. The message names the culprit and what was expected."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite; nothing was saved from the poisoned weights."""


class WriteFailed(RuntimeError):
    """A checkpoint or model write failed; the previous complete one is untouched and every rank stopped."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span pages), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
