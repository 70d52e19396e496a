"""The one exception type users see: a one-line message naming the bad value and the rule."""


class LynxError(Exception):
    """Bad input or an impossible request; the CLI prints the message without a traceback."""
