"""The exceptions the CLI turns into one line on stderr: bad input (exit 2), a diverged run (exit 3).

Anything else is a bug (exit 1).
"""


class BadInput(ValueError):
    """Bad config, path, data or checkpoint. The message names the culprit and what was expected."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite; nothing was saved from the poisoned weights."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span pages), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
