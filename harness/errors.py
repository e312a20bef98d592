"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug (exit 1).
"""


class BadInput(ValueError):
    """Bad config, path, data or checkpoint. The message names the culprit and what was expected."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span pages), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
