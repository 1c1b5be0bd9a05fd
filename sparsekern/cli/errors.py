"""The error a command raises for a problem the user can fix (printed without a traceback)."""


class CliError(RuntimeError):
    """Printed as ``sparsekern <command>: error: <message>``; the exit status is 1."""
