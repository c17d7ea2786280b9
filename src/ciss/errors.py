"""The error kinds the command line maps to exit codes."""


class CissError(Exception):
    """A user-facing problem (bad input, bad usage): one clear line, exit code 2."""


class CheckFailed(Exception):
    """A check ran and failed (retention gate, parity, NaN loss): exit code 1."""


class DiskFull(CissError):
    """The disk filled (or a quota ran out) while writing ``path``: one line, exit code 2.

    The writer that raises it has already removed its partial files, so the store is as it
    was; the message says how much the write needed and how much is free where it was going.
    """

    def __init__(self, path, needed_bytes: int | None = None) -> None:
        import contextlib
        import shutil
        from pathlib import Path

        self.path = Path(path) if path else None
        self.needed_bytes = needed_bytes
        free = None
        probe = self.path
        while probe is not None and not probe.exists() and probe != probe.parent:
            probe = probe.parent
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(probe or ".").free
        need = (f"{max(1, round(needed_bytes / 2**20))} MB needed" if needed_bytes
                else "size needed unknown")
        have = f"{free / 2**20:.0f} MB free" if free is not None else "free space unknown"
        super().__init__(f"no space left on device while writing {path or '?'}: {need}, "
                         f"{have}")
