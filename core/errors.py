"""User-facing errors: each one is a single line that says what is wrong and what to do."""


class LoomError(Exception):
    """A failure the user can fix (bad recipe, bad input, impossible layout, full disk).

    Entry points print its message as one line and exit with status 2, without a traceback.
    """


def named(what: str, value: object) -> str:
    """How an error names the input at fault, as the user typed it: `--flag VALUE:` for a
    command-line flag, `recipe.key: VALUE` for a recipe key."""
    return f"{what} {value}:" if what.startswith("-") else f"{what}: {value}"
