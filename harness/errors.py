"""The errors a run can end with, and the exit code of each: the one table the CLI, the stall watchdog and the
Slurm job script follow."""


class BadInput(ValueError):
    """Bad config, path, data or checkpoint. The message names the culprit and what was expected."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite; nothing was saved from the poisoned weights."""


class WriteFailed(RuntimeError):
    """A checkpoint or model write failed; the previous complete one is untouched and every rank stopped."""


# 0 success, 1 a bug (anything not below); the stall watchdog ends its process itself with EXIT_STALLED.
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STALLED, EXIT_WRITE_FAILED = 2, 3, 4, 5
EXIT_CODES = {BadInput: EXIT_BAD_INPUT, TrainingDiverged: EXIT_DIVERGED, WriteFailed: EXIT_WRITE_FAILED}
KNOWN_ERRORS = tuple(EXIT_CODES)


def exit_code(error: BaseException) -> int:
    return next((code for cls, code in EXIT_CODES.items() if isinstance(error, cls)), 1)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span pages), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
