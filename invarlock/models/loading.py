"""Load a checkpoint for scoring, fingerprint its tensors, and save an edited copy atomically.

This is the one place where transformers and torch errors raised while loading or saving
become InvarLock's InputError, and where the HF libraries are silenced for library use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

from invarlock import plugins
from invarlock.atomic import default_mode
from invarlock.enums import AdapterKind
from invarlock.errors import EvidenceError, InputError, InvarlockError
from invarlock.models.device import (  # torch via device.py: MissingExtraError if absent
    checkpoint_dtype,
    resolve_device,
    resolve_device_map,
    resolve_dtype,
    torch,
)
from invarlock.models.effective import storage_tensors
from invarlock.models.source import (
    PICKLE_FILE,
    PICKLE_INDEX,
    ModelSource,
    detect_adapter,
    read_config,
    weight_files,
    weights_digest,
)
from invarlock.network import enforce_offline

logger = logging.getLogger(__name__)


@cache
def _transformers() -> Any:
    """transformers, imported offline-safe and quiet (no progress bars, errors only)."""
    enforce_offline()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@cache
def _foreign_errors() -> tuple[type[Exception], ...]:
    """What transformers, torch and safetensors raise for unreadable or unfit checkpoints."""
    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError,
            SafetensorError)


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn loader/saver exceptions into one-line InputErrors naming ``action``."""
    try:
        yield
    except InvarlockError:
        raise
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"cannot {action}: the pickle checkpoint holds objects other than tensors and was "
            "refused by torch's weights-only loader"
        ) from exc
    except Exception as exc:
        if not isinstance(exc, _foreign_errors()):
            raise
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise InputError(f"cannot {action}: {first}") from exc


@dataclass
class LoadedModel:
    """A model ready for scoring (eval mode, no grads, on its device) and what it is."""

    model: torch.nn.Module
    tokenizer: Any              # a transformers PreTrainedTokenizerBase
    adapter: AdapterKind
    source: ModelSource
    config: dict
    dtype: torch.dtype
    device: str
    architecture: str
    model_type: str
    parameters: int             # unique parameters (tied weights counted once)
    weights_digest: str         # files on disk; for an edited model, tensor_digest
    format: dict | None = None  # GGUF / quantized checkpoints: what format.py describes
    device_map: dict | None = None  # module -> device when spread by accelerate


def _auto_class(adapter: AdapterKind) -> Any:
    transformers = _transformers()
    return {
        AdapterKind.CAUSAL_LM: transformers.AutoModelForCausalLM,
        AdapterKind.MASKED_LM: transformers.AutoModelForMaskedLM,
        AdapterKind.SEQ_CLS: transformers.AutoModelForSequenceClassification,
    }[adapter]


def load_model(
    source: ModelSource,
    *,
    adapter: AdapterKind | str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    dequantize: bool = False,
    device_map: str | None = None,
    max_memory: dict[int | str, int] | None = None,
    tokenizer: Any = None,
) -> LoadedModel:
    """Load ``source`` for scoring with the adapter's head, refusing anything unsafe or partial.

    safetensors unless ``allow_pickle`` (pickles then go through torch's weights-only
    unpickler); never remote code; never the network (the source is already local). A
    checkpoint that leaves any parameter of the head class uninitialised is an error:
    scoring randomly initialised weights would certify nothing.

    ``device_map`` (auto, balanced, balanced_low_0, sequential) spreads the model over the
    GPUs through accelerate, within ``max_memory`` bytes per device, offloading what does not
    fit to CPU memory and then to disk; inputs then go to ``device``.

    ``tokenizer``: the checkpoint's own tokenizer when the caller has loaded it already
    (`load_tokenizer`), so that it is not loaded twice.
    """
    config = read_config(source)
    kind = adapter if isinstance(adapter, AdapterKind) else detect_adapter(config, adapter)
    files = weight_files(source, allow_pickle=allow_pickle)
    pickled = files[0].name in (PICKLE_FILE, PICKLE_INDEX)
    device = resolve_device(device)
    device_map = resolve_device_map(device_map)
    torch_dtype = resolve_dtype(dtype, device, checkpoint_dtype(config))
    requested = "auto" if isinstance(adapter, AdapterKind) else adapter
    plugin = plugins.adapter_plugin_for(config, requested)
    from invarlock.models import formats

    if device_map is not None:
        if plugin is not None and plugin.load is not None:
            raise InputError(f"adapter plugin '{plugin.name}' loads its own models; "
                             "--device-map applies to Hugging Face checkpoints only")
        extra = formats.load_kwargs(source, config, device, pickled)
        extra.pop("device_map", None)  # the user's map places quantized modules too
        model, info = _load_dispatched(source, kind, torch_dtype, extra, device_map,
                                       max_memory)
        _check_loading_info(source, model, info)
    elif plugin is not None and plugin.load is not None:
        with _translated(f"load model '{source}' with adapter plugin '{plugin.name}'"):
            model = plugin.load(source.path, dtype=torch_dtype, device=device)
        logger.info("model %s loaded by adapter plugin %s", source, plugin.name)
    else:
        with _translated(f"load model '{source}'"):
            model, info = _auto_class(kind).from_pretrained(
                str(source.path), dtype=torch_dtype, weights_only=True,
                trust_remote_code=False, local_files_only=True, output_loading_info=True,
                **formats.load_kwargs(source, config, device, pickled),
            )
        _check_loading_info(source, model, info)
    if formats.is_quantized(config) and dequantize:
        formats.dequantize_(model)
    if device_map is None and not formats_placed(config):
        with _translated(f"move model '{source}' to {device}"):
            model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer is None:
        tokenizer = load_tokenizer(source, required=False)
    if kind is AdapterKind.SEQ_CLS and model.config.pad_token_id is None:
        # Decoder classifiers find each row's last token through the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    architectures = config.get("architectures") or [type(model).__name__]
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, adapter=kind, source=source, config=config,
        dtype=torch_dtype, device=device, architecture=str(architectures[0]),
        model_type=str(config.get("model_type", "")),
        parameters=sum(p.numel() for p in model.parameters()),
        weights_digest=weights_digest(files),
        device_map=dict(getattr(model, "hf_device_map", None) or {}) or None,
    )
    _describe_format(loaded, device, dequantize)
    logger.info("loaded %s (%s, %s params, %s on %s)", source, loaded.architecture,
                f"{loaded.parameters:,}", str(torch_dtype).replace("torch.", ""), device)
    return loaded


def formats_placed(config: dict) -> bool:
    """Quantized models are placed on their device while loading (device_map)."""
    from invarlock.models import formats

    return formats.is_quantized(config)


def _describe_format(loaded: LoadedModel, device: str, dequantize: bool) -> None:
    from invarlock.models import formats

    loaded.format = formats.describe(loaded.source, loaded.config, loaded.model, device,
                                     dequantize)
    if loaded.format is not None:
        from invarlock.models.effective import parameter_count

        loaded.parameters = parameter_count(loaded.model)


def _load_dispatched(source: ModelSource, kind: AdapterKind, dtype: torch.dtype,
                     extra: dict[str, Any], device_map: str,
                     max_memory: dict[int | str, int] | None) -> tuple[Any, dict]:
    """from_pretrained through accelerate's device map; disk offload goes to a private
    temporary folder removed with the model."""
    try:
        import accelerate  # noqa: F401 - transformers needs it for device maps
    except ImportError as exc:
        from invarlock.errors import MissingExtraError

        raise MissingExtraError("--device-map (accelerate)") from exc
    offload = tempfile.mkdtemp(prefix="invarlock-offload-")
    try:
        with _translated(f"load model '{source}' with device map '{device_map}'"):
            model, info = _auto_class(kind).from_pretrained(
                str(source.path), dtype=dtype, weights_only=True,
                trust_remote_code=False, local_files_only=True, output_loading_info=True,
                device_map=device_map, max_memory=max_memory, offload_folder=offload, **extra,
            )
    except BaseException:
        shutil.rmtree(offload, ignore_errors=True)
        raise
    weakref.finalize(model, shutil.rmtree, offload, True)
    _TIED[model] = _tied_groups(model)  # before any forward pass unties offloaded copies
    placed = Counter(str(d) for d in (getattr(model, "hf_device_map", None) or {}).values())
    logger.info("model %s placed by device map '%s': %s", source, device_map,
                ", ".join(f"{n} module group(s) on {d}" for d, n in sorted(placed.items())))
    return model, info


def has_offloaded_weights(model: torch.nn.Module) -> bool:
    """Whether some weights live off the model (CPU or disk offload by a device map)."""
    if not getattr(model, "hf_device_map", None):
        return False
    from accelerate.utils import has_offloaded_params

    return any(has_offloaded_params(module) for module in model.modules())


@contextlib.contextmanager
def weights_on_host(model: torch.nn.Module) -> Iterator[None]:
    """Offloaded weights (device map) brought into CPU memory for the duration of the block.

    Code that reads weights directly (guards, fingerprints) then sees real tensors; those
    modules compute on the CPU inside the block. Afterwards their weights go back to the
    offload store (changes made inside the block to disk-offloaded weights are not kept).
    Without offloaded weights this does nothing.
    """
    if not has_offloaded_weights(model):
        yield
        return
    from accelerate.utils import has_offloaded_params

    cpu = torch.device("cpu")
    slots = _parameter_slots(model)
    tied = _TIED.setdefault(model, _tied_groups(model))
    resident: list[tuple[torch.nn.Module, Any, Any]] = []
    try:
        for module in model.modules():
            if not has_offloaded_params(module):
                continue
            hook = module._hf_hook
            resident.append((module, hook, hook.execution_device))
            hook.execution_device = cpu
            hook.pre_forward(module)       # weights from the offload store onto the CPU
            hook.offload = False           # forward passes inside the block keep them there
        _retie(model, tied)
        yield
    finally:
        for module, hook, device in reversed(resident):
            hook.offload = True
            hook.post_forward(module, None)  # back to the offload store (meta tensors)
            hook.execution_device = device
        for module, name, param in slots:  # the slots as they were before the block
            module._parameters[name] = param


def empty_parameters(model: torch.nn.Module) -> None:
    """Empty every parameter of `model` in place (tied weights are one parameter): its
    memory is let go while the modules, their hooks and everyone holding them stay."""
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def refill_parameters(model: torch.nn.Module, fresh: torch.nn.Module) -> None:
    """Give `model`'s (emptied) parameters the tensors of `fresh`, the same architecture,
    by name."""
    mine, theirs = dict(model.named_parameters()), dict(fresh.named_parameters())
    if mine.keys() != theirs.keys():
        missing = sorted(set(mine) ^ set(theirs))
        raise EvidenceError(f"the subject loaded again has other parameters than the one let "
                            f"go ({len(missing)} differ, first: {missing[0]})")
    for name, p in mine.items():
        p.data = theirs[name].data


def _parameter_slots(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, Any]]:
    """(module, name, parameter) of every parameter slot; a tied parameter fills several."""
    return [(module, name, param) for module in model.modules()
            for name, param in module._parameters.items() if param is not None]


# Tied parameter slots of each model placed by a device map, recorded when it is loaded:
# accelerate's hooks put a fresh parameter in each slot after every forward pass, so the
# sharing is visible only before the first one.
_TIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tied_groups(model: torch.nn.Module) -> list[list[tuple[str, str]]]:
    """(module name, parameter name) of the slots sharing one parameter, per group."""
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    groups: dict[int, list[tuple[str, str]]] = {}
    for module, name, param in _parameter_slots(model):
        groups.setdefault(id(param), []).append((names[id(module)], name))
    return [members for members in groups.values() if len(members) > 1]


def _retie(model: torch.nn.Module, tied: list[list[tuple[str, str]]]) -> None:
    """Make tied slots hold one tensor again once offloaded weights are brought in.

    Each offloaded module loads its own copy of a tied weight (the embedding and the LM
    head), so without this a model placed by a device map would show no tying, unlike the
    same model loaded whole: the placement would change what the invariants see.
    """
    for members in tied:
        slots = [(model.get_submodule(m), n) for m, n in members]
        loaded = [mod._parameters[n] for mod, n in slots
                  if mod._parameters.get(n) is not None
                  and mod._parameters[n].device.type != "meta"]
        if loaded:
            for module, name in slots:
                module._parameters[name] = loaded[0]


def _check_loading_info(source: ModelSource, model: Any, info: dict) -> None:
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing:
        raise InputError(
            f"model '{source}' has no weights for {len(missing)} parameter(s) of "
            f"{type(model).__name__} (first: {missing[0]}); the checkpoint does not fit "
            "this adapter"
        )
    if mismatched:
        raise InputError(
            f"model '{source}' has {len(mismatched)} weight(s) whose shape does not fit its "
            f"config (first: {mismatched[0]})"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        logger.info("model %s: %d checkpoint weight(s) unused by %s (e.g. %s)", source,
                    len(unexpected), type(model).__name__, unexpected[0])


def load_tokenizer(source: ModelSource | Path | str, required: bool = True) -> Any:
    """The checkpoint's own tokenizer (AutoTokenizer; local files only, no remote code).

    A GGUF checkpoint's tokenizer is the tokenizer files in its folder, else the one embedded
    in the file; with neither, None when not `required` (the caller uses the baseline's).

    A folder whose files other than weights are byte for byte those of a folder loaded before
    gives the same tokenizer object again (`_tokenizer_inputs`): a subject saved with its
    baseline's tokenizer is not loaded, nor hashed, a second time.
    """
    path = source.path if isinstance(source, ModelSource) else Path(source)
    transformers = _transformers()
    extra: dict[str, Any] = {}
    if isinstance(source, ModelSource) and source.gguf_file:
        from invarlock.models import formats

        origin = formats.tokenizer_origin(source)
        if origin is None:
            if required:
                raise InputError(f"GGUF model '{source}' carries no tokenizer and its folder "
                                 "holds no tokenizer files")
            return None
        if origin == formats.TOKENIZER_GGUF:
            extra["gguf_file"] = source.gguf_file
    key = None if extra else _tokenizer_inputs(path)
    if key is not None and key in _TOKENIZERS:
        return _TOKENIZERS[key]
    with _translated(f"load the tokenizer of '{source}'"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(path), **_TOKENIZER_LOADING, **extra)
    if key is not None:
        while len(_TOKENIZERS) >= 4:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[key] = tokenizer
    return tokenizer


_TOKENIZERS: dict[tuple, Any] = {}
# Given with every load, so these keys of a tokenizer_config.json never matter (a tokenizer
# re-saved after a local load records local_files_only: true).
_TOKENIZER_LOADING = {"trust_remote_code": False, "local_files_only": True}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                    ".onnx", ".index.json")
_TOKENIZER_INPUT_MAX = 64 * 2**20


def _tokenizer_inputs(folder: Path) -> tuple | None:
    """Name and sha256 of every file in `folder` that is not weights: all a tokenizer can be
    loaded from (tokenizer files, configs, templates); tokenizer_config.json without the
    options every load overrides. None when that cannot be told cheaply (not a folder,
    unreadable, or a non-weight file over 64 MiB)."""
    try:
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES))
        if any(p.stat().st_size > _TOKENIZER_INPUT_MAX for p in files):
            return None
        return tuple((p.name, hashlib.sha256(_tokenizer_input(p)).hexdigest()) for p in files)
    except OSError:
        return None


def _tokenizer_input(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name != "tokenizer_config.json":
        return data
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return data
    if not isinstance(config, dict):
        return data
    kept = {k: v for k, v in config.items() if k not in _TOKENIZER_LOADING}
    return json.dumps(kept, sort_keys=True).encode("utf-8")


def tensor_digest(model: torch.nn.Module) -> str:
    """Digest of the state dict's tensors in name order (`hashing.tree_sha256`).

    Each tensor contributes a header (name, dtype, shape) and its raw bytes in pieces, each
    piece copied to the CPU on its own, so the digest does not depend on the device and no
    whole copy of a GPU model is made. Tied weights appear under several names in the state
    dict; only the first name in sorted order is hashed.
    """
    from invarlock.models.hashing import tree_sha256

    seen: set[tuple] = set()
    state = dict(plain for name, tensor in model.state_dict(keep_vars=True).items()
                 for plain in storage_tensors(name, tensor))  # quantized: their inner tensors

    def parts() -> Iterator[bytes | Callable[[], bytes]]:
        for name in sorted(state):
            tensor = state[name].detach()
            if tensor.numel():
                alias_key = (str(tensor.device), tensor.data_ptr(), tensor.dtype,
                             tuple(tensor.shape), tensor.stride())
                if alias_key in seen:
                    continue
                seen.add(alias_key)
            header = f"{name}|{str(tensor.dtype).replace('torch.', '')}|{tuple(tensor.shape)}"
            yield header.encode("utf-8") + b"\0"
            yield from _tensor_pieces(tensor)

    return tree_sha256(parts())


def _tensor_pieces(tensor: torch.Tensor) -> Iterator[Callable[[], bytes]]:
    """Jobs hashing `tensor`'s bytes a piece at a time. A piece on an accelerator is copied to
    the host here, in order on the calling thread (its streams are not shared with the hash
    threads); the pool hashes it while the next piece is copied."""
    from invarlock.models.hashing import piece_bounds

    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    on_host = flat.device.type == "cpu"
    for offset, length in piece_bounds(flat.numel()):
        piece = flat[offset:offset + length]
        yield partial(_sha256_of, piece if on_host else piece.to("cpu"))


def _sha256_of(host: torch.Tensor) -> bytes:
    return hashlib.sha256(host.numpy().data).digest()


def save_checkpoint(loaded: LoadedModel, out_dir: Path | str) -> None:
    """Write model (safetensors), config and tokenizer to ``out_dir`` all-or-nothing.

    Everything is written into a hidden sibling directory that is renamed into place only
    after every file is complete, so an interrupted or failed save leaves no partial
    checkpoint. An existing non-empty ``out_dir`` is never overwritten.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"refusing to overwrite '{out_dir}': it exists and is not empty")
    _transformers()
    with _translated(f"write checkpoint '{out_dir}'"):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial",
                                        dir=out_dir.parent))
    try:
        with _translated(f"write checkpoint '{out_dir}'"):
            loaded.model.save_pretrained(staging)
            loaded.tokenizer.save_pretrained(staging)
            weight_files(staging)  # safetensors present, or this raises
            if out_dir.exists():
                out_dir.rmdir()
            os.chmod(staging, default_mode(0o777))  # mkdtemp makes it private
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved checkpoint to %s", out_dir)
