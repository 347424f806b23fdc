"""The command's exit statuses, and the refusal of a command-line value (status 2, like argparse's)."""

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A value on the command line that cannot work: exit status 2, like argparse's own refusals."""
