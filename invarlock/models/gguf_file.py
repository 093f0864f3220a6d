"""GGUF checkpoints (llama.cpp's format): metadata, tensors under Hugging Face names, writing.

transformers loads a GGUF file by dequantizing every tensor to float and renaming it from
GGUF's `blk.N.attn_q.weight` scheme to the model's parameter names (undoing llama.cpp's
layout changes: the rotary permutation of q/k, GPT-2's transposed Conv1D weights). This module
uses the same name map to read one tensor at a time (the baseline's weights for the guards,
memory bounded by one tensor) and, in the other direction, to write a model as GGUF with
Q8_0/Q4_0 blocks from the `gguf` package.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from invarlock.errors import InputError
from invarlock.gguf_types import majority_type

logger = logging.getLogger(__name__)

SUFFIX = ".gguf"
# Types `gguf` can write (quantize) in pure numpy, by the names llama.cpp uses.
WRITABLE_TYPES = ("Q8_0", "Q4_0")
_TENSOR_TYPES_NOTE = "GGUF tensor types by count"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        from invarlock.errors import EvidenceError

        raise EvidenceError("reading GGUF files needs the `gguf` package: "
                            "pip install 'invarlock[gguf]'") from exc
    return gguf


def find_gguf_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(f"*{SUFFIX}") if p.is_file())


def choose_gguf(directory: Path, wanted: str | None, spec: str) -> str | None:
    """The GGUF file to use in `directory`: `wanted`, the only one there, or None (none)."""
    found = find_gguf_files(directory)
    if wanted:
        if wanted in found:
            return wanted
        if not found:
            return None
        raise InputError(f"--gguf-file {wanted}: no such file in '{spec}' "
                         f"(it holds {', '.join(found)})")
    if len(found) > 1:
        raise InputError(f"model folder '{spec}' holds {len(found)} GGUF files "
                         f"({', '.join(found[:4])}); choose one with --gguf-file NAME")
    return found[0] if found else None


def _reader(path: Path) -> Any:
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError/... on a bad file
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"'{path.name}' is not a readable GGUF file: {text}") from exc


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file is: its architecture, the config it implies, its tensor types."""

    path: Path
    architecture: str             # GGUF's general.architecture (llama, gpt2, qwen2, ...)
    config: dict[str, Any]        # the transformers config it loads as (to_dict())
    carried_keys: tuple[str, ...]  # config keys the file states (the rest are defaults)
    tensor_types: dict[str, int]  # GGML type name -> number of tensors
    has_tokenizer: bool
    type_parameters: dict[str, int] = field(default_factory=dict)  # type -> parameters

    @property
    def file_type(self) -> str:
        """The type that holds most of the weights (Q8_0, Q4_0, F16, ...), by parameter count.

        Counting tensors would let many small tensors of one type outvote the few large
        matrices that hold the model; F32 (norms, biases) is set aside unless it is all there
        is. A file that mixes types records each type's share (`gguf_format`).
        """
        return majority_type(self.type_parameters or self.tensor_types)


@cache
def gguf_info(path: Path) -> GGUFInfo:
    """Read a GGUF file's metadata (memory-mapped; no tensor data is dequantized)."""
    reader = _reader(path)
    _silence_progress()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except Exception as exc:  # transformers: ValueError for an unsupported architecture
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load GGUF file '{path.name}': {text}") from exc
    carried = dict(parsed.get("config") or {})
    model_type = str(carried.get("model_type", ""))
    if model_type == "gpt2" and "n_ctx" in carried:
        # GGUF states GPT-2's context once; transformers reads it into n_ctx only, while the
        # position table is sized by n_positions.
        carried.setdefault("n_positions", carried["n_ctx"])
    from transformers import AutoConfig

    try:
        config_obj = AutoConfig.for_model(model_type, **{
            k: v for k, v in carried.items() if k not in ("model_type", "_model_name_or_path")})
    except Exception as exc:
        raise InputError(f"GGUF file '{path.name}' has model type '{model_type}', which "
                         f"transformers cannot build: {exc}") from exc
    config = config_obj.to_dict()
    if not config.get("architectures"):
        config["architectures"] = [_causal_class(model_type)]
    types, parameters = type_counts(reader)
    arch_field = reader.fields.get("general.architecture")
    architecture = str(_field_value(arch_field)) if arch_field is not None else model_type
    return GGUFInfo(path=path, architecture=architecture, config=config,
                    carried_keys=tuple(sorted(k for k in carried if not k.startswith("_"))),
                    tensor_types=dict(sorted(types.items())),
                    type_parameters=dict(sorted(parameters.items())),
                    has_tokenizer="tokenizer.ggml.tokens" in reader.fields)


def type_counts(reader: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Tensors and parameters per GGML type, as the file's tensor table states them."""
    tensors: Counter[str] = Counter()
    parameters: Counter[str] = Counter()
    for tensor in reader.tensors:
        tensors[tensor.tensor_type.name] += 1
        parameters[tensor.tensor_type.name] += int(tensor.n_elements)
    return dict(tensors), dict(parameters)


def _silence_progress() -> None:
    """transformers' GGUF loader draws its own tqdm bar (not covered by its progress-bar
    switch); library use prints none."""
    import functools

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    gguf_utils.tqdm = functools.partial(tqdm, disable=True)


def _field_value(field: Any) -> Any:
    part = field.parts[field.data[0]]
    try:
        return bytes(part).decode("utf-8")
    except (TypeError, UnicodeDecodeError):
        return part.tolist()[0] if hasattr(part, "tolist") else part


def _causal_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise InputError(f"GGUF model type '{model_type}' has no causal LM class in transformers")
    return str(name)


def config_object(config: dict[str, Any]) -> Any:
    """A transformers config built from a `GGUFInfo.config` dict."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**{k: v for k, v in config.items()
                                   if k not in ("transformers_version",)})


def _skeleton(config: dict[str, Any]) -> Any:
    """The model class built on the meta device (names and shapes, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config_object(config))


def _processor(architecture: str, config: dict[str, Any]) -> Any:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)


class GGUFTensors:
    """A GGUF file's tensors under the model's parameter names, dequantized one at a time.

    Same surface as safetensors' `safe_open`: `keys()` and `get_tensor(name)`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.info = gguf_info(self.path)
        self._reader = _reader(self.path)
        processor_config = dict(self.info.config)
        self._processor = _processor(self.info.architecture, processor_config)
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        gguf_to_hf = get_gguf_hf_weights_map(_skeleton(self.info.config), self._processor)
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._by_hf: dict[str, str] = {}
        for gguf_name in self._tensors:
            hf = gguf_to_hf.get(gguf_name)
            if gguf_name == "output.weight" and self.info.architecture == "gpt2":
                hf = "lm_head.weight"
            if hf is not None:
                self._by_hf[hf] = gguf_name

    def keys(self) -> list[str]:
        return list(self._by_hf)

    def get_tensor(self, name: str) -> Any:
        import numpy as np
        import torch

        gguf = _gguf()
        tensor = self._tensors[self._by_hf[name]]
        weights = gguf.dequantize(tensor.data, tensor.tensor_type)
        if tensor.name == "output.weight" and self.info.architecture == "gpt2":
            return torch.from_numpy(np.array(weights, dtype=np.float32))
        result = self._processor.process(weights=weights, name=tensor.name,
                                         tensor_key_mapping={}, parsed_parameters={})
        return torch.from_numpy(np.array(result.weights, dtype=np.float32))


# --- writing ----------------------------------------------------------------------------


def _gguf_architecture(model_type: str) -> str:
    from gguf import MODEL_ARCH_NAMES

    aliases = {"cohere": "command-r", "qwen2_moe": "qwen2moe", "gemma3_text": "gemma3"}
    wanted = aliases.get(model_type, model_type)
    if wanted not in MODEL_ARCH_NAMES.values():
        raise InputError(f"cannot write model type '{model_type}' as GGUF: llama.cpp has no "
                         "such architecture")
    return wanted


def _layout_to_gguf(architecture: str, gguf_name: str, array: Any, config: Any) -> Any:
    """The inverse of transformers' GGUF processors: HF layout -> llama.cpp layout."""
    if architecture in ("llama", "mistral") and (".attn_q." in gguf_name
                                                 or ".attn_k." in gguf_name):
        heads = config.num_attention_heads
        if ".attn_k." in gguf_name:
            heads = getattr(config, "num_key_value_heads", None) or heads
        # llama.cpp's rotary permutation (convert_hf_to_gguf.py, LlamaModel.permute)
        return (array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:])
                .swapaxes(1, 2).reshape(array.shape))
    if architecture == "gpt2" and any(part in gguf_name for part in (
            "attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")):
        return array.T
    return array


def gguf_names(model: Any) -> dict[str, str]:
    """Parameter name -> GGUF tensor name for every tensor of `model` that GGUF stores."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    config = model.config
    architecture = _gguf_architecture(config.model_type)
    gguf_to_hf = get_gguf_hf_weights_map(model, _processor(architecture, config.to_dict()))
    names = {hf: g for g, hf in gguf_to_hf.items()}
    if architecture == "gpt2" and "lm_head.weight" in dict(model.named_parameters()):
        names.setdefault("lm_head.weight", "output.weight")
    return names


def quantize_block_array(array: Any, qtype_name: str) -> Any:
    """`array` (float32, GGUF layout) quantized with GGML type `qtype_name` (raw blocks)."""
    gguf = _gguf()
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType[qtype_name])


def dequantize_block_array(blocks: Any, qtype_name: str) -> Any:
    gguf = _gguf()
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype_name])


def quantizable(shape: tuple[int, ...], qtype_name: str) -> bool:
    """Whether a tensor of `shape` (GGUF layout) fits the type's blocks along its rows."""
    gguf = _gguf()
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype_name]]
    return len(shape) == 2 and shape[-1] % block == 0


def round_trip_(model: Any, parameter_names: list[str], qtype_name: str) -> list[str]:
    """Replace each named weight with its GGUF `qtype_name` quantize→dequantize round trip.

    Done in the GGUF layout so that the saved blocks dequantize to exactly these weights.
    Returns the names actually quantized (weights whose rows do not fit the blocks stay).
    """
    import numpy as np
    import torch

    names = gguf_names(model)
    architecture = _gguf_architecture(model.config.model_type)
    params = dict(model.named_parameters())
    done = []
    with torch.no_grad():
        for name in parameter_names:
            param = params.get(name)
            target = names.get(name)
            if param is None or target is None:
                continue
            array = param.detach().to("cpu", torch.float32).numpy()
            laid = np.ascontiguousarray(_layout_to_gguf(architecture, target, array, model.config))
            if not quantizable(laid.shape, qtype_name):
                continue
            back = dequantize_block_array(quantize_block_array(laid, qtype_name), qtype_name)
            restored = _layout_from_gguf(architecture, target, back.reshape(laid.shape),
                                         model.config)
            param.copy_(torch.from_numpy(np.ascontiguousarray(restored)).to(param.dtype))
            done.append(name)
    return done


def _layout_from_gguf(architecture: str, gguf_name: str, array: Any, config: Any) -> Any:
    processor = _processor(architecture, config.to_dict())
    return processor.process(weights=array, name=gguf_name, tensor_key_mapping={},
                             parsed_parameters={"tensors": {}}).weights


def write_gguf(model: Any, tokenizer: Any, path: Path, qtype_name: str,
               quantized: list[str]) -> dict[str, int]:
    """Write `model` as GGUF: the `quantized` weights as `qtype_name`, the rest as float.

    Float tensors keep the model's precision (F32, or F16/BF16 for half models), so that
    loading the file back gives the same weights bit for bit; the quantized ones are stored as
    the blocks `round_trip_` made. The tokenizer (byte-level BPE) is embedded so that
    llama.cpp and transformers can use the file alone. Returns tensor counts by type.
    """
    import numpy as np
    import torch

    gguf = _gguf()
    config = model.config
    architecture = _gguf_architecture(config.model_type)
    names = gguf_names(model)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(str(getattr(config, "_name_or_path", "") or config.model_type))
    writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{qtype_name}"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(writer, architecture, config)
    _write_tokenizer(writer, tokenizer, config)
    counts: Counter[str] = Counter()
    wanted = set(quantized)
    seen: set[int] = set()
    for name, param in model.state_dict(keep_vars=True).items():
        target = names.get(name)
        if target is None:
            continue
        tensor = param.detach()
        key = tensor.data_ptr()
        if key in seen and name == "lm_head.weight":
            continue  # tied to the embedding: GGUF omits output.weight
        seen.add(key)
        array = tensor.to("cpu", torch.float32).numpy()
        laid = np.ascontiguousarray(_layout_to_gguf(architecture, target, array, config))
        if name in wanted and quantizable(laid.shape, qtype_name):
            blocks = quantize_block_array(laid, qtype_name)
            writer.add_tensor(target, blocks, raw_dtype=gguf.GGMLQuantizationType[qtype_name])
            counts[qtype_name] += 1
            continue
        if tensor.dtype == torch.float16:
            writer.add_tensor(target, laid.astype(np.float16))
            counts["F16"] += 1
        else:
            writer.add_tensor(target, laid.astype(np.float32))
            counts["F32"] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(counts)


def _write_hparams(writer: Any, architecture: str, config: Any) -> None:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    mapping = GGUF_CONFIG_MAPPING.get(architecture) or {}
    values = config.to_dict()
    if architecture == "gpt2":
        values["feed_forward_length"] = config.n_inner or 4 * config.n_embd
        values["n_ctx"] = config.n_positions
    if "rope_theta" not in values:
        rope = values.get("rope_parameters") or {}
        if isinstance(rope, dict) and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
    if "head_dim" in dict(mapping.items()).values() and not values.get("head_dim"):
        values["head_dim"] = config.hidden_size // config.num_attention_heads
    for gguf_key, hf_key in mapping.items():
        value = values.get(hf_key) if hf_key else None
        if value is None or isinstance(value, (list, dict)):
            continue
        key = f"{architecture}.{gguf_key}"
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)


def _write_tokenizer(writer: Any, tokenizer: Any, config: Any) -> None:
    """Embed a byte-level BPE tokenizer (vocabulary, merges, token types, specials)."""
    if tokenizer is None:
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model = state.get("model") or {}
    if model.get("type") != "BPE":
        logger.info("tokenizer is not BPE: the GGUF file carries no tokenizer")
        return
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in state.get("added_tokens", [])}}
    size = max(max(vocab.values()) + 1, int(config.vocab_size))
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["id"] for t in state.get("added_tokens", []) if t.get("special")}
    types = [3 if i in special else (5 if tokens[i].startswith("[PAD") and i not in
                                     vocab.values() else 1) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role, add in (("bos_token_id", writer.add_bos_token_id),
                      ("eos_token_id", writer.add_eos_token_id)):
        value = getattr(tokenizer, role, None)
        if isinstance(value, int):
            add(value)
