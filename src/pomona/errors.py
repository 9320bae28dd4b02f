"""The base class of the errors pomona reports to a user as one line (exit code 2) instead of a traceback: a bad
data layout, an unreadable image, missing weights, a stale export, bad balancing settings, ... Each module
defines its own subclass next to the code that raises it; the CLI catches this one class."""


class PomonaError(Exception):
    """A problem with the user's data, settings or set-up; the message says what and how to fix it."""
