"""User-facing errors: each one is a single line that says what is wrong and what to do."""


class LoomError(Exception):
    """A failure the user can fix (bad recipe, bad input, impossible layout, full disk).

    Entry points print its message as one line and exit with status 2, without a traceback.
    """
