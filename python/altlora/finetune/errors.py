"""The one exception type the command line turns into a one-line message and a non-zero exit."""


class CLIError(Exception):
    """A problem the user can fix (missing package, bad value); its message is the whole answer."""
