"""Where a dump goes: an explicit `dump_dir=`, else the innermost `qatfx.debug.dump(dir)`
block, else `QATFX_DUMP_DIR`.

Drivers (prepare_pt2e, convert_pt2e, the toggles, `.train()`, the Inductor pass) resolve
the folder once with `resolve_dump_dir` and pass it down to the passes they run; a pass
never looks it up itself. The `dump()` block is a context variable, so concurrent threads
and nested blocks each see their own folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import time
from pathlib import Path
from typing import Iterator, Optional, Union

DUMP_ENV = "QATFX_DUMP_DIR"
PathLike = Union[str, os.PathLike]

_scope: contextvars.ContextVar[Optional[Path]] = contextvars.ContextVar("qatfx_dump_dir", default=None)


@contextlib.contextmanager
def dump_scope(directory: PathLike) -> Iterator[Path]:
    """Within the block, passes run without an explicit `dump_dir=` dump into `directory`."""
    path = Path(directory)
    token = _scope.set(path)
    try:
        yield path
    finally:
        _scope.reset(token)


def resolve_dump_dir(dump_dir: Optional[PathLike] = None) -> Optional[Path]:
    """The folder a dump goes to, or None when dumping is off.

    `QATFX_DUMP_DIR=root` gives each process its own `root/run-<time>-<pid>/`, so runs of a
    script never mix (see docs/debugging.md).
    """
    if dump_dir is not None:
        return Path(dump_dir)
    scoped = _scope.get()
    if scoped is not None:
        return scoped
    root = os.environ.get(DUMP_ENV)
    return _process_run_dir(root, os.getpid()) if root else None


@functools.cache
def _process_run_dir(root: str, pid: int) -> Path:
    # Keyed by pid too: a forked worker gets a folder of its own, not its parent's.
    return Path(root) / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{pid}"
