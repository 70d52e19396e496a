"""The one exception type users see: a one-line message naming the bad value and the rule."""

DEBUG_ENV = "LYNXPIPE_DEBUG"
"""Set (to anything) to see the traceback of an unexpected error, here or on a rank."""


class LynxError(Exception):
    """Bad input or an impossible request; the CLI prints the message without a traceback."""

    exit_code = 2
    """Exit status of the CLI when this error ends a command (click's usage-error code)."""


class Interrupted(LynxError):
    """The user pressed Ctrl-C; the message says what survives and how to continue."""

    exit_code = 130
