"""QATGraphModule: the GraphModule prepare and convert return.

An exported GraphModule refuses `.train()` / `.eval()`; this one rewrites its dropout and
batch-norm ops instead (passes/train_eval.py), keeping their p / eps / momentum. It keeps
the per-layer report and the stage ("prepared" / "converted") through `copy.deepcopy`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx

from qatfx.graph.meta import CAPTURED
from qatfx.graph.metadata_asserts import remove_metadata_asserts
from qatfx.instrument.settings import resolve_dump_dir
from qatfx.passes.infra import run_pass
from qatfx.passes.train_eval import graph_training_mode, set_training_mode


def _deepcopy_graph_module(deepcopy, memo):
    # torch >= 2.13 warns from inside its own GraphModule deepcopy (its pytree codegen
    # still checks `isinstance(spec, LeafSpec)`); nothing a user can act on, so keep it quiet.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        return deepcopy(memo)


class QATGraphModule(torch.fx.GraphModule):
    # Attributes carried through deepcopy, beside what GraphModule keeps itself.
    _QATFX_ATTRS = ("qatfx_stage", "qatfx_layers", "qatfx_dump_dir", "qatfx_region")
    # The source model's attributes a whole capture keeps (the exports read the config).
    MODEL_ATTRS = ("config", "generation_config")

    qatfx_stage: str
    qatfx_layers: list
    qatfx_dump_dir: Optional[str]
    qatfx_region: str  # its path in the user's model ("" for a whole-model capture)

    def dump_folder(self, dump_dir=None) -> Optional[Path]:
        """Where a pass on this graph dumps: `dump_dir`, else the folder given at prepare,
        else the current `qatfx.debug.dump` / QATFX_DUMP_DIR folder (resolved now); a region
        of a model dumps into a subfolder named by its path."""
        if dump_dir is None and self.qatfx_dump_dir is not None:
            return Path(self.qatfx_dump_dir)  # chosen at prepare, per region already
        root = resolve_dump_dir(dump_dir)
        return root / self.qatfx_region if root is not None and self.qatfx_region else root

    def train(self, mode: bool = True) -> "QATGraphModule":
        super().train(mode)
        if graph_training_mode(self.graph) not in (None, mode):
            run_pass(self, "train" if mode else "eval", set_training_mode(mode), dump_dir=self.dump_folder())
        return self

    def keep_methods_of(self, source: torch.nn.Module) -> None:
        """Answer calls to `source`'s own methods (not forward) by calling them on `source`:
        a region stands in for a block whose model calls its methods (torchtune's decoder
        asks its layers `caches_are_enabled()`). `source` is held, not registered, and its
        submodules are pointed at this graph's own parameter and buffer dicts: it keeps no
        tensor alive by itself (FSDP2's shards free the full weights) and its methods see
        what the graph sees (shards, `load_state_dict(assign=True)`)."""
        for path, module in source.named_modules():
            try:
                own = self.get_submodule(path)
            except AttributeError:
                continue
            for name, value in module._parameters.items():
                if value is None:  # a Linear's bias=None: keep the attribute readable
                    own._parameters.setdefault(name, None)
            module._parameters = own._parameters
            module._buffers = own._buffers
        self.__dict__["_qatfx_source"] = source

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get("_qatfx_source")
            if source is None or name == "forward" or not callable(getattr(type(source), name, None)):
                raise
            return getattr(source, name)

    def __deepcopy__(self, memo):
        res = _deepcopy_graph_module(super().__deepcopy__, memo)
        if "_qatfx_source" in self.__dict__:
            res.__dict__["_qatfx_source"] = self.__dict__["_qatfx_source"]
        _keep_non_persistent_buffers(self, res)
        for attr in self._QATFX_ATTRS:
            setattr(res, attr, copy.deepcopy(getattr(self, attr, None), memo))
        for attr in self.MODEL_ATTRS:
            if attr in self.__dict__:
                res.__dict__[attr] = copy.deepcopy(self.__dict__[attr], memo)
        res.training = self.training
        return res


def keep_model_attributes(gm: QATGraphModule, model: Any) -> None:
    """`gm` (a whole capture of `model`) carries the model's `config` and `generation_config`,
    so the exports and `save_pretrained`-style code find them as on the model itself."""
    for attr in QATGraphModule.MODEL_ATTRS:
        value = getattr(model, attr, None)
        if value is not None:
            gm.__dict__[attr] = value


def captured_copy(exported: torch.fx.GraphModule) -> QATGraphModule:
    """The QATGraphModule prepare works on: a copy of the exported graph sharing its tensors,
    without export's tensor-metadata asserts, which would pin it to the capture device."""
    gm = copy_sharing_tensors(exported)
    if remove_metadata_asserts(gm.graph):
        gm.recompile()
    return gm


def copy_sharing_tensors(gm: torch.fx.GraphModule) -> QATGraphModule:
    """A QATGraphModule with its own graph and submodules but the same parameter and buffer
    tensors as `gm` (no memory copy; `gm` itself is left untouched)."""
    memo = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    copied = _deepcopy_graph_module(lambda m: copy.deepcopy(gm, m), memo)
    _keep_non_persistent_buffers(gm, copied)  # GraphModule's deepcopy rebuilds the module without them
    if isinstance(copied, QATGraphModule):
        return copied
    module = QATGraphModule(copied, copied.graph)
    _keep_non_persistent_buffers(gm, module)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(copied, attr):
            setattr(module, attr, getattr(copied, attr))
    module.meta = dict(getattr(copied, "meta", {}))
    module.qatfx_stage = CAPTURED
    module.qatfx_layers = []
    module.qatfx_dump_dir = None
    module.qatfx_region = ""
    mode = graph_training_mode(module.graph)
    module.training = True if mode is None else mode
    for sub in module.modules():
        sub.training = module.training
    return module


def copy_model_sharing_tensors(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of any module (its class, attributes and submodules; the qatfx graphs inside
    it copied as above) sharing every parameter and buffer tensor with `model`."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _keep_non_persistent_buffers(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """GraphModule's constructor (deepcopy too) re-registers the buffers it copies as
    persistent; a buffer
    the model registered with persistent=False (a RoPE table) must stay out of state_dict,
    or a float checkpoint no longer loads with strict=True."""
    for path, submodule in source.named_modules():
        names = getattr(submodule, "_non_persistent_buffers_set", ())
        if not names:
            continue
        owner = target.get_submodule(path)
        owner._non_persistent_buffers_set.update(n for n in names if n in owner._buffers)

