"""Progress that suits where it goes: a live bar on a terminal, one line per stage in a log.

A redrawn bar sent to a file becomes hundreds of carriage-return lines (`make demo > log`), so
when stderr is not a terminal each stage prints a single summary line when it ends instead.
"""

from __future__ import annotations

import sys
import time


class LineProgress:
    """The tqdm calls the training loop makes, printed as one line when the stage closes."""

    def __init__(self, total: int, desc: str, stream=None) -> None:
        self.total = total
        self.desc = desc
        self.n = 0
        self.postfix: dict[str, str] = {}
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kw) -> None:
        self.postfix = {k: str(v) for k, v in kw.items()}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} iterations in "
              f"{time.perf_counter() - self.t0:.1f}s{extra}", file=self.stream, flush=True)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(tqdm, *, total: int, desc: str, enabled: bool = True):
    """A tqdm bar on a terminal, a :class:`LineProgress` elsewhere, nothing when disabled."""
    if not enabled:
        return _Silent()
    if is_terminal():
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    return LineProgress(total, desc)
