"""The two error kinds the command line maps to exit codes."""


class CissError(Exception):
    """A user-facing problem (bad input, bad usage): one clear line, exit code 2."""


class CheckFailed(Exception):
    """A check ran and failed (retention gate, parity, NaN loss): exit code 1."""
