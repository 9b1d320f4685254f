"""Instrumentation below the passes: where dumps go (settings.py), graph text
(text.py), before/after snapshots and diffs (snapshot.py), which line made each node
(provenance.py), dump folders and their HTML (dumping.py, html.py, svg.py), TORCH_TRACE
artifacts (trace.py) and the recorder of the Inductor-side stages (lowering.py).

The passes and the lowering call into this package; it never imports them. The user-facing
tools built on it (`qatfx.debug.dump`, `compare`) live in qatfx.debug."""
