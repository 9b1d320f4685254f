"""qatfx graphs in PyTorch's structured trace (`TORCH_TRACE=dir`, read with tlparse).

Each pass logs its graph as an artifact named `qatfx_<pass>_before` / `qatfx_<pass>_after`
(FX passes) or `qatfx_inductor_<stage>_after` (the Inductor-side rewrites, filed under
their compile id), through `torch._logging.trace_structured` (torch >= 2.11 has the same
signature). Nothing is formatted unless a trace file is being written.

Importing it also names the "qatfx" loggers in torch._logging, for TORCH_LOGS=+qatfx.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

log = logging.getLogger("qatfx.debug")


def enabled() -> bool:
    """Whether TORCH_TRACE output is being written: torch's trace handler has a directory.
    torch attaches that handler even without TORCH_TRACE (it removes itself on first use),
    and test runners attach their own capture handlers to the trace logger: neither counts."""
    from torch._logging._internal import LazyTraceHandler, trace_log

    return any(isinstance(h, LazyTraceHandler) and (h.root_dir is not None or h.stream is not None) for h in trace_log.handlers)


@functools.cache
def _takes_expect_trace_id() -> bool:
    from torch._logging import trace_structured

    return "expect_trace_id" in inspect.signature(trace_structured).parameters


def artifact(name: str, encoding: str, payload_fn: Callable[[], Any]) -> None:
    """Log one artifact; `payload_fn` runs only if torch writes it."""
    from torch._logging import trace_structured

    # prepare/convert run outside any compile: without this torch records a stack per event.
    extra = {"expect_trace_id": False} if _takes_expect_trace_id() else {}
    try:
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": name, "encoding": encoding},
            payload_fn=payload_fn,
            **extra,
        )
    except Exception as exc:  # a debugging aid must not break compilation
        log.warning("qatfx: could not log %s to TORCH_TRACE: %s", name, exc)


def graph_artifact(name: str, text_fn: Callable[[], str]) -> None:
    artifact(name, "string", text_fn)


def _register_torch_log() -> None:
    """Name the "qatfx" logger hierarchy in torch._logging's registry, so `TORCH_LOGS=+qatfx`
    and `torch._logging.set_logs(modules={"qatfx": logging.DEBUG})` switch it like torch's
    own components (and TORCH_LOGS=help lists it). torch's private API: skipped quietly
    where it differs; TORCH_LOGS still finds qatfx as a module name then."""
    try:
        from torch._logging._internal import register_log

        register_log("qatfx", ["qatfx"])
    except Exception as exc:  # only the TORCH_LOGS alias is lost
        log.debug("qatfx: not registered with torch._logging: %s", exc)


_register_torch_log()
