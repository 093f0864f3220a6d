"""The effective float weights of a model, whatever format its modules are stored in.

Guards compare weights by the baseline's parameter names (`...q_proj.weight`). A quantized
module stores something else under its name: a tensor subclass (torchao, optimum-quanto), an
int8/uint8 parameter with side tensors (bitsandbytes: `SCB`, `weight.absmax`, ...), or packed
buffers (GPTQ/AWQ: `qweight`, `scales`, `qzeros`, `g_idx`). `EffectiveWeights` is a read-only
mapping from the float model's names to float tensors: plain parameters as they are, and each
quantized module's weight dequantized on access, one module at a time (nothing is cached, so
at most one extra module is held in float while a guard works through the mapping). The
format's own tensors are listed separately (`format_tensors`), for the invariants to accept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

# Buffers that packed formats keep next to the weight (GPTQ/AWQ/Marlin and friends).
_PACKED = ("qweight", "qzeros", "scales", "g_idx", "scale", "zero", "W_q")


def _plain(tensor: Any) -> bool:
    return type(tensor) in (torch.Tensor, torch.nn.Parameter)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether `module` holds its weight in a quantized form."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        if not _plain(weight) or not weight.dtype.is_floating_point:
            return weight.dim() >= 1 and _dequantizer(module) is not None
        return False
    return any(isinstance(getattr(module, n, None), torch.Tensor) for n in ("qweight", "W_q"))


def _dequantizer(module: torch.nn.Module) -> Any:
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit":
        return _bnb4
    if kind == "Int8Params" or hasattr(weight, "SCB") or hasattr(module, "SCB"):
        return _bnb8
    if weight is not None and not _plain(weight) and callable(getattr(weight, "dequantize",
                                                                          None)):
        return lambda m: m.weight.dequantize()
    if callable(getattr(module, "dequantize_weight", None)):  # GPTQ/AWQ QuantLinear
        return lambda m: m.dequantize_weight()
    if callable(getattr(module, "dequantize", None)):  # HQQLinear
        return lambda m: m.dequantize()
    return None


def _bnb8(module: torch.nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnb_f

    weight = module.weight
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = module.state.SCB
    return bnb_f.int8_vectorwise_dequant(weight.data, scales)


def _bnb4(module: torch.nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnb_f

    return bnb_f.dequantize_4bit(module.weight.data, module.weight.quant_state)


def effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """`module`'s weight as float32: dequantized for a quantized module, else as stored."""
    if is_quantized(module):
        fn = _dequantizer(module)
        if fn is None:
            raise TypeError(f"cannot dequantize {type(module).__name__}")
        with torch.no_grad():
            weight = fn(module).detach().to(torch.float32)
        out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if weight.dim() == 2 and tuple(weight.shape) == (in_f, out_f) and in_f != out_f:
            weight = weight.T  # packed formats may dequantize to [in, out]
        return weight
    return module.weight.detach()


def _out_in(module: torch.nn.Module) -> tuple[int, ...]:
    """The float weight's shape of a quantized module, without dequantizing it."""
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):
        return (out_f, in_f)
    return tuple(effective_weight(module).shape)


class EffectiveWeights(Mapping[str, torch.Tensor]):
    """Name → float tensor over a model's parameters and buffers, quantized ones dequantized.

    Iteration order is the model's state-dict order; a quantized module appears once, as
    `<module>.weight`, and its format tensors not at all.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._quantized: dict[str, torch.nn.Module] = {}
        for name, module in model.named_modules():
            if is_quantized(module):
                self._quantized[f"{name}.weight" if name else "weight"] = module
        owners = {n.removesuffix("weight").rstrip(".") for n in self._quantized}
        self._plain: dict[str, torch.Tensor] = {}
        self.format_tensors: list[str] = []
        self._order: list[str] = []
        for name, tensor in model.state_dict(keep_vars=True).items():
            owner = _owner(name, owners)
            if owner is None:
                self._plain[name] = tensor
                self._order.append(name)
                continue
            key = f"{owner}.weight" if owner else "weight"
            if name.endswith(".bias") and name.count(".") == key.count("."):
                self._plain[name] = tensor
                self._order.append(name)
            elif key not in self._order:
                self._order.append(key)
            if name != key and not name.endswith(".bias"):
                self.format_tensors.append(name)
        for key in self._quantized:
            if key not in self._order:
                self._order.append(key)

    @property
    def quantized(self) -> list[str]:
        """Names whose tensor is dequantized on access."""
        return list(self._quantized)

    def shape(self, name: str) -> tuple[int, ...]:
        module = self._quantized.get(name)
        return tuple(self._plain[name].shape) if module is None else _out_in(module)

    def __getitem__(self, name: str) -> torch.Tensor:
        module = self._quantized.get(name)
        if module is not None:
            return effective_weight(module)
        return self._plain[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._quantized or name in self._plain


def _owner(name: str, owners: set[str]) -> str | None:
    """The quantized module that a state-dict entry belongs to (its longest prefix), if any."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in owners:
            return prefix
        if parts[cut - 1] == "weight" and ".".join(parts[:cut - 1]) in owners:
            return ".".join(parts[:cut - 1])  # bitsandbytes: <module>.weight.absmax, ...
    return None


def named_matrices(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every floating parameter, quantized weights dequantized one at a time.

    The tensors of unquantized parameters are the parameters themselves (so tied weights can
    be found by storage); a dequantized tensor is new on every access.
    """
    view = EffectiveWeights(model)
    quantized = set(view.quantized)
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in quantized or _owner(name, {q.removesuffix(".weight") for q in quantized}):
            continue
        yield name, param
    for name in view.quantized:
        yield name, view[name]


def storage_tensors(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Plain tensors holding `tensor`'s data: itself, or a subclass's inner tensors."""
    if _plain(tensor) or not hasattr(tensor, "__tensor_flatten__"):
        yield name, tensor
        return
    inner_names, _ = tensor.__tensor_flatten__()
    for inner in inner_names:
        yield from storage_tensors(f"{name}:{inner}", getattr(tensor, inner))


def module_digests(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every 2-D effective weight (float32 bytes, row-major), by parameter name."""
    out = {}
    seen: set[int] = set()
    view = EffectiveWeights(model)
    for name in view:
        if len(view.shape(name)) != 2:
            continue
        tensor = view[name]
        if not tensor.dtype.is_floating_point:
            continue
        if name not in view.quantized:
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        out[name] = "sha256:" + hashlib.sha256(data.numpy().tobytes()).hexdigest()
    return out


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the float model (a quantized weight counts as its float shape)."""
    view = EffectiveWeights(model)
    total = 0
    seen: set[int] = set()
    params = {id(p) for p in model.parameters()}
    for name in view:
        if name in view.quantized:
            total += int(torch.Size(view.shape(name)).numel())
            continue
        tensor = view._plain[name]
        if id(tensor) in params and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def dequantize_modules_(model: torch.nn.Module) -> list[str]:
    """Replace every quantized module by an nn.Linear holding its dequantized weight.

    Used only for `--dequantize` (no kernels for the device): one module is converted at a
    time, so memory grows by the float weights but never holds two copies of the model.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or not is_quantized(module):
            continue
        weight = effective_weight(module)
        bias = getattr(module, "bias", None)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                 device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias.detach().to(weight.dtype))
        linear.requires_grad_(False)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, linear)
        replaced.append(name)
    return replaced


def describe(model: torch.nn.Module) -> Mapping[str, Any]:
    """How many modules are quantized and which format tensors were accepted."""
    view = EffectiveWeights(model)
    return {"quantized_modules": len(view.quantized),
            "format_tensors": len(view.format_tensors)}
