"""The one exception type for expected, user-caused problems.

The CLI prints a `UserError` as a single line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, a bad config or a missing file: the message names the problem and how to fix it."""
