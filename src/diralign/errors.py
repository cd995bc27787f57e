"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a single line on stderr and exit status 2; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""
