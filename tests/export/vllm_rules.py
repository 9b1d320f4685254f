"""vLLM's reading rules for a compressed-tensors `quantization_config` (W4A16 / W8A16
pack-quantized groups, W8A8 int-quantized groups, one or several config groups), as checks
on a written config.json. Each rule cites the vLLM source it restates: vLLM 0.34.0 (commit
62d4bc3c7; paths under vllm/model_executor/layers/quantization/), with the differences of
the older releases named where a rule depends on them. The W8A8 and several-group rules
(marked "main") were read from vLLM's main-branch sources as stored by the search index
(compressed_tensors.py `_quantization_scheme_map_from_config`, `_get_scheme_from_parts`,
`_is_dynamic_token_w8a8`, `get_scheme_dict`; compressed_tensors/utils.py
`find_matched_target`; schemes/compressed_tensors_w8a8_int8.py), not from the 0.34.0 tree
itself, so they name functions, not line numbers. docs/export_hf.md has the same table.

vLLM itself cannot be a test dependency here (its wheel pins another torch; importing its
CompressedTensorsConfig on this CPU needs a separate 7 GB environment), so the rules are
restated and the config is also validated with the compressed-tensors models vLLM uses.
"""

from __future__ import annotations

import re

# compressed-tensors 0.11.0 (pinned by vLLM 0.11.0) QuantizationArgs fields; its models are
# extra="forbid" (quant_args.py:361), so any other key fails to parse there.
CT_0_11_WEIGHT_FIELDS = {
    "num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder", "observer", "observer_kwargs",
}
CT_0_11_SCHEME_FIELDS = {"targets", "weights", "input_activations", "output_activations", "format"}
# compressed_tensors/compressed_tensors.py:254-269 (from_config): the keys vLLM reads
READ_KEYS = {"quant_method", "config_groups", "ignore", "format", "sparsity_config", "transform_config", "kv_cache_scheme"}
# vLLM 0.11.0 and 0.20.0 WNA16_SUPPORTED_BITS (schemes/compressed_tensors_wNa16.py:39-47)
SUPPORTED_BITS = {4, 8}
# utils/marlin_utils.py:32
MARLIN_GROUP_SIZES = {-1, 32, 64, 128}
# vLLM's packed_modules_mapping for Llama-style models; compressed_tensors/utils.py:53-70
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _effective_format(group: dict, global_format) -> str:
    # main: _quantization_scheme_map_from_config / get_scheme_dict: the group's own format,
    # else the global one (a vLLM that predates per-group formats reads only the global one)
    return group.get("format") or global_format


def _weight_only_violations(name: str, group: dict) -> list:
    """pack-quantized: vLLM's CompressedTensorsWNA16 (W4A16 / W8A16, Marlin)."""
    found, weights = [], group.get("weights") or {}
    # CT:698-708 _is_wNa16_group_channel: channel/group strategy, no input activations, static
    if weights.get("strategy") not in ("group", "channel") or group.get("input_activations") or weights.get("dynamic", False):
        found.append(f"{name}: not a static group/channel weight-only scheme (_is_wNa16_group_channel)")
    if weights.get("type", "int") != "int" or not weights.get("symmetric", True):
        found.append(f"{name}: Marlin W4A16 takes symmetric int weights (uint4b8)")
    if weights.get("num_bits", 8) not in SUPPORTED_BITS:
        found.append(f"{name}: {weights.get('num_bits', 8)} bits; vLLM 0.11/0.20 take {sorted(SUPPORTED_BITS)}")
    group_size = weights.get("group_size")
    if weights.get("strategy") == "group" and group_size not in MARLIN_GROUP_SIZES:
        found.append(f"{name}: group_size {group_size} not in Marlin's {sorted(MARLIN_GROUP_SIZES)} (marlin_utils.py:32)")
    return found


def _w8a8_violations(name: str, group: dict) -> list:
    """int-quantized: vLLM's CompressedTensorsW8A8Int8 (main: _get_scheme_from_parts, reached
    only for an activation-quantization format)."""
    found, weights, acts = [], group.get("weights") or {}, group.get("input_activations")
    # main: _is_static_tensor_w8a8 / _is_dynamic_token_w8a8 read input_quant.num_bits, so an
    # int-quantized group without input activations matches no scheme (an AttributeError)
    if not acts:
        return [f"{name}: int-quantized without input_activations matches no vLLM scheme (weight-only int8 is pack-quantized W8A16)"]
    # main: _is_dynamic_token_w8a8 (and _is_static_tensor_w8a8): 8-bit weights and
    # activations, weights per channel or per tensor, symmetric, static; "Both symmetric and
    # asymmetric input quantization supported" (an asymmetric input runs with an activation
    # zero point: CompressedTensorsW8A8Int8(input_symmetric=False), azp_adj)
    if weights.get("num_bits", 8) != 8 or acts.get("num_bits", 8) != 8:
        found.append(f"{name}: W8A8 needs 8-bit weights and activations")
    if weights.get("type", "int") != "int" or acts.get("type", "int") != "int":
        found.append(f"{name}: CompressedTensorsW8A8Int8 takes int weights and activations")
    if weights.get("strategy") not in ("channel", "tensor") or not weights.get("symmetric", True) or weights.get("dynamic", False):
        found.append(f"{name}: W8A8 int weights must be static, symmetric, per channel or per tensor (_is_dynamic_token_w8a8)")
    token = acts.get("strategy") == "token" and acts.get("dynamic", False) is True
    tensor = acts.get("strategy") == "tensor" and not acts.get("dynamic", False)
    if not (token or tensor):
        found.append(
            f"{name}: W8A8 activations are dynamic per token or static per tensor (_is_dynamic_token_w8a8 / _is_static_tensor_w8a8)"
        )
    return found


def _vllm_target(layer: str, cls: str, q: dict):
    """main: compressed_tensors/utils.py find_matched_target: the layer name against every
    target in order (exact, or `re:` with re.match), then the class name containing a target
    (check_contains, lower case), then a fused layer whose every shard matches a name (the
    first shard's target). Returns the group key of the matched target, or None."""
    owner = {}
    for key, group in q.get("config_groups", {}).items():
        for target in group.get("targets", []):
            owner[target] = key  # target_scheme_map: a later group's same target overrides it

    def named(value: str, target: str) -> bool:
        return re.match(target[3:], value) is not None if target.startswith("re:") else target == value

    for target in owner:
        if named(layer, target):
            return owner[target]
    for target in owner:
        if not target.startswith("re:") and target.lower() in cls.lower():
            return owner[target]
    fused = next((f for f in FUSED if layer.endswith(f)), None)
    if fused is not None:
        shards = [next((t for t in owner if named(layer.replace(fused, s), t)), None) for s in FUSED[fused]]
        if all(shards):
            return owner[shards[0]]
    return None


def _ct_target(module: str, q: dict):
    """compressed-tensors' match_targets (utils/match.py): exact names, then `re:` patterns,
    then the class name ("Linear" matches every nn.Linear, lm_head included), first wins."""
    ordered = [(key, t) for key, group in q.get("config_groups", {}).items() for t in group.get("targets", [])]
    for kind in ("exact", "re", "class"):
        for key, target in ordered:
            if kind == "exact" and target == module or kind == "class" and target == "Linear":
                return key
            if kind == "re" and target.startswith("re:") and re.match(target[3:], module):
                return key
    return None


def vllm_rule_violations(config: dict, linear_modules: list) -> list:
    """Every rule `config` (a config.json dict) breaks; `linear_modules`: the checkpoint's
    linear module names (vLLM's names before fusion)."""
    q = config.get("quantization_config")
    if q is None:
        return ["no quantization_config (weight_utils.py:256)"]
    found = []
    # weight_utils.py:256 / model_arch_config_convertor.py:274: how vLLM picks the method
    if q.get("quant_method") != "compressed-tensors":
        found.append(f"quant_method {q.get('quant_method')!r} is not 'compressed-tensors'")
    unread = set(q) - READ_KEYS - {"quantization_status"}
    if unread:
        found.append(f"keys vLLM never reads (CT from_config:254-269), carried only by newer compressed-tensors: {sorted(unread)}")
    if q.get("sparsity_config"):  # CT:286-300: a non-empty sparsity config with targets is deprecated
        found.append("a non-empty sparsity_config")
    if q.get("transform_config"):  # CT:111-114: validated with TransformConfig (extra="forbid")
        found.append("a transform_config")
    global_format = q.get("format")
    for name, group in q.get("config_groups", {}).items():
        extra = set(group) - CT_0_11_SCHEME_FIELDS
        if extra:
            found.append(f"{name}: scheme fields compressed-tensors 0.11 forbids: {sorted(extra)}")
        for part in ("weights", "input_activations"):
            extra = set(group.get(part) or {}) - CT_0_11_WEIGHT_FIELDS
            if extra:
                found.append(f"{name}: {part} fields compressed-tensors 0.11 (vLLM 0.11) forbids: {sorted(extra)}")
        fmt = _effective_format(group, global_format)
        # CT:865-874: W4A16 is selected only for the pack-quantized format (the group's, else the
        # global one); main: W8A8 int only for an activation-quantization format
        # (compressed_tensors/utils.py is_activation_quantization_format: naive-, int-,
        # float-quantized, and nvfp4-pack-quantized in later versions)
        if fmt == "pack-quantized":
            found += _weight_only_violations(name, group)
        elif fmt == "int-quantized":
            found += _w8a8_violations(name, group)
        else:
            found.append(f"{name}: format {fmt!r} is neither pack-quantized (W4A16/W8A16) nor int-quantized (W8A8)")
        if (group.get("weights") or {}).get("actorder") in ("group", "dynamic"):  # CT:336-345
            found.append(f"{name}: actorder {group['weights']['actorder']!r}")
        # compressed_tensors.py:186-193: ParallelLMHead is matched by name only; before vLLM 0.20
        # (PR #37291) a quantized lm_head does not load at all
        if "lm_head" in group.get("targets", []):
            found.append(f"{name}: targets lm_head, which vLLM before 0.20 cannot load "
                         + ("packed" if fmt == "pack-quantized" else "quantized"))
    ignore = set(q.get("ignore", []))
    for entry in ignore:  # CT:142-155: exact module names or re: patterns, no substrings
        if not entry.startswith("re:") and entry not in linear_modules:
            found.append(f"ignore entry {entry!r} names no linear module of the checkpoint")
    for parent in sorted({m.rpartition(".")[0] for m in linear_modules}):
        for fused, members in FUSED.items():  # compressed_tensors/utils.py:53-70 should_ignore_layer
            present = [f"{parent}.{m}" for m in members if f"{parent}.{m}" in linear_modules]
            ignored = [m for m in present if m in ignore]
            if ignored and len(ignored) != len(present):
                found.append(f"{parent}.{fused}: shards {ignored} ignored, the others quantized ('vLLM requires all to use the same scheme')")
    # every quantized linear gets in vLLM the group compressed-tensors (transformers, and the
    # writer) gives it: vLLM matches the fused layer (qkv_proj, gate_up_proj) and lm_head (a
    # ParallelLMHead: no "Linear" in its class name) its own way (main: find_matched_target)
    for module in linear_modules:
        if module in ignore:
            continue
        parent, _, leaf = module.rpartition(".")
        fused = next((f for f, members in FUSED.items() if leaf in members), None)
        layer = f"{parent}.{fused}" if fused and all(f"{parent}.{m}" in linear_modules for m in FUSED[fused]) else module
        cls = "ParallelLMHead" if module == "lm_head" else "QKVParallelLinear" if fused == "qkv_proj" else "RowParallelLinear"
        want, got = _ct_target(module, q), _vllm_target(layer, cls, q)
        if want is None:
            found.append(f"{module}: neither ignored nor targeted by a config group (vLLM: no matching target)")
        elif got != want:
            found.append(f"{module}: vLLM reads it ({layer}) with {got or 'no group'}, transformers with {want}")
    return found
