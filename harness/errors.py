"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug (exit 1).
"""


class BadInput(ValueError):
    """Bad config, path, data or checkpoint. The message names the culprit and what was expected."""
