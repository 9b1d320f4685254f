"""vLLM's reading rules for a compressed-tensors W4A16 `quantization_config`, as checks on a
written config.json. Each rule cites the vLLM source it restates: vLLM 0.34.0 (commit
62d4bc3c7; paths under vllm/model_executor/layers/quantization/), with the differences of
the older releases named where a rule depends on them. docs/export_hf.md has the same table.

vLLM itself cannot be a test dependency here (its wheel pins another torch; importing its
CompressedTensorsConfig on this CPU needs a separate 7 GB environment), so the rules are
restated and the config is also validated with the compressed-tensors models vLLM uses.
"""

from __future__ import annotations

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
        weights = group.get("weights") or {}
        extra = set(weights) - CT_0_11_WEIGHT_FIELDS
        if extra:
            found.append(f"{name}: weight fields compressed-tensors 0.11 (vLLM 0.11) forbids: {sorted(extra)}")
        # CT:865-874: W4A16 is selected only for the pack-quantized format (the group's, else the global one)
        if (group.get("format") or global_format) != "pack-quantized":
            found.append(f"{name}: format {group.get('format') or global_format!r} is not pack-quantized")
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
        if weights.get("actorder") in ("group", "dynamic"):  # CT:336-345
            found.append(f"{name}: actorder {weights['actorder']!r}")
        # compressed_tensors.py:186-193: ParallelLMHead is matched by name only; before vLLM 0.20
        # (PR #37291) a packed lm_head does not load at all
        if "lm_head" in group.get("targets", []):
            found.append(f"{name}: targets lm_head, which vLLM before 0.20 cannot load packed")
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
    return found
