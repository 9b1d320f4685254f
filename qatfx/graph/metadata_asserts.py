"""torch.export's tensor-metadata asserts.

Every `x.to(...)` in a model leaves `aten._assert_tensor_metadata(x, dtype=, device=, layout=)`
in the exported graph: a check of what export saw, with no effect on the values. Its
`device=` pins the graph to the capture device (a model prepared on CPU and then moved to a
GPU would fail it), and a second user of a node blocks Inductor's epilogue fusion; both
capture and the lowering drop them.
"""

from __future__ import annotations

import torch
import torch.fx


def remove_metadata_asserts(graph: torch.fx.Graph) -> int:
    """Erase every `_assert_tensor_metadata` node; returns how many."""
    found = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default]
    for node in found:
        graph.erase_node(node)
    return len(found)
