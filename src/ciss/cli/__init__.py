"""The ``ciss`` command line: each command parses options, makes one library call, prints.

One module per command group; ``base`` below them holds the group and the shared options.
Importing this package registers every command on ``main``.
"""

from ciss.cli import (  # noqa: F401
    analysis,
    collect,
    data,
    demo,
    deploy,
    export,
    inspect,
    memory,
    prune,
    store,
    train,
    update,
)
from ciss.cli.base import main

__all__ = ["main"]
