"""The keys qatfx writes into `node.meta` / `GraphModule.meta`, and the stage names of a
qatfx module, in one place. Everything that reads or writes them imports them from here."""

# node.meta
ANNOTATION_KEY = "qatfx_annotation"  # quantizer: a LinearAnnotation or SkipAnnotation per linear site
SPEC_META_KEY = "qatfx_spec"  # the QuantSpec of a fake-quant / dequantize node
ROLE_META_KEY = "qatfx_role"  # "input" or "weight"
FORMAT_META_KEY = "qatfx_format"  # the weight format (qatfx.formats) a dequantize node reads
PASS_META_KEY = "qatfx_pass"  # the pass that created the node
SOURCE_META_KEY = "qatfx_source"  # the line of code that created it (only while dumping)
RULE_META_KEY = "qatfx_rewrite"  # the Inductor-side rule (Rewrite.name) that created it
TRAIN_DROPOUT_META_KEY = "qatfx_train_dropout_p"  # an attention op's train-mode dropout_p, kept in eval

# GraphModule.meta
HISTORY_META_KEY = "qatfx_pass_history"  # names of the passes run on the module, in order

# A learnable weight spec's trained qparams: parameters registered beside the weight
# (`<weight>_learned_scale`, `<weight>_learned_zero`), read by its fake-quant node.
LEARNED_SCALE_SUFFIX = "_learned_scale"
LEARNED_ZERO_SUFFIX = "_learned_zero"

# Roles of a quantized operand.
INPUT = "input"
WEIGHT = "weight"

# QATGraphModule.qatfx_stage
CAPTURED = "captured"
PREPARED = "prepared"
CONVERTED = "converted"
