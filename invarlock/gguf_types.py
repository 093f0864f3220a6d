"""What a GGUF file's tensor types say about it: the type that names it, its bit width, and
whether its matrices mix types.

One rule, used both where the `format` record is written (`invarlock.models`) and where
`verify` re-derives the record's labels from its own `tensor_parameters`, so a certificate
cannot name a file by the type that holds the fewest weights. Pure: plain mappings in.
"""

from __future__ import annotations

from collections.abc import Mapping

GGUF_BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8, "Q8_1": 8, "Q6_K": 6, "Q5_0": 5,
             "Q5_1": 5, "Q5_K": 5, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q3_K": 3, "Q2_K": 2}
UNKNOWN = "unknown"


def majority_type(weights: Mapping[str, int]) -> str:
    """The type that holds most of the weights (parameters per type; ties to the larger name).

    F32 (norms, biases) is set aside unless it is all there is: counting it, or counting
    tensors instead of parameters, would let many small tensors outvote the matrices that
    hold the model."""
    stored = {k: v for k, v in weights.items() if k != "F32"} or dict(weights)
    return max(stored.items(), key=lambda kv: (kv[1], kv[0]))[0] if stored else UNKNOWN


def mixed_types(parameters: Mapping[str, int]) -> bool:
    """More than one stored type outside F32 (e.g. Q4_K matrices with Q6_K or Q8_0 ones):
    then the file's type and bits name the majority, not every weight."""
    return len([k for k, v in parameters.items() if k != "F32" and v > 0]) > 1
