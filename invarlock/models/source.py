"""Where a model comes from and what it is, decided from files alone (no torch).

A model is a local checkpoint directory, a Hugging Face Hub id (``org/name`` or ``hf:org/name``;
downloaded only with INVARLOCK_ALLOW_NETWORK=1, else taken from the local HF cache), or
``demo``, the model bundled with InvarLock, or a GGUF file (a ``.gguf`` path, or a folder
holding one). The adapter (how it is scored) is read from config.json (for GGUF, from the
file's metadata), and the weight files are found, vetted (safetensors unless pickles are
allowed) and digested here.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from invarlock import plugins
from invarlock.enums import ADAPTER_ALIASES, AdapterKind
from invarlock.errors import InputError
from invarlock.network import NETWORK_ENV, enforce_offline, network_allowed

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# Hub ids: "name" or "org/name" (letters, digits, - _ .), as the Hub accepts them.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# What a hub download fetches: configs, tokenizer files and safetensors (pickles on request).
_HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")

# Fallback when config.json lists no architectures: model families by model_type.
_CAUSAL_TYPES = frozenset({
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "mixtral", "qwen2", "qwen3",
    "qwen2_moe", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "opt", "falcon", "bloom",
    "olmo", "olmo2", "stablelm", "starcoder2", "smollm3", "granite", "cohere",
})
_MLM_TYPES = frozenset({
    "bert", "roberta", "distilbert", "albert", "xlm-roberta", "camembert", "deberta",
    "deberta-v2", "mpnet", "modernbert", "electra",
})


@dataclass(frozen=True)
class ModelSource:
    """A model as the user named it, and the local directory it resolved to."""

    spec: str                   # as given: path, hub id, "hf:ID", or "demo"
    kind: str                   # "local" | "hub" | "demo"
    path: Path | None           # local checkpoint directory (hub: the cached snapshot)
    hub_id: str | None = None
    revision: str | None = None
    gguf_file: str | None = None  # a GGUF checkpoint: its file name inside `path`

    def __str__(self) -> str:
        return self.spec


def resolve_model_source(
    spec: str, *, revision: str | None = None, allow_pickle: bool = False,
    gguf_file: str | None = None,
) -> ModelSource:
    """Resolve ``spec`` to a local checkpoint directory, downloading only when allowed.

    ``allow_pickle`` widens a hub download to pickle weights; it loads nothing. A ``.gguf``
    file, or a folder with GGUF files and no config.json (or with ``gguf_file`` among them),
    is a GGUF checkpoint.
    """
    spec = (spec or "").strip()
    if not spec:
        raise InputError("no model given: pass a checkpoint directory, a hub id or 'demo'")
    if spec == "demo":
        return ModelSource(spec=spec, kind="demo", path=_demo_dir())
    if spec.startswith("hf:"):
        return _resolve_hub(spec, spec[3:], revision, allow_pickle)
    path = Path(spec).expanduser()
    if path.exists():
        if revision:
            raise InputError(f"a revision applies only to hub models, not to '{spec}'")
        if path.is_file() and path.suffix.lower() == gguf_file_suffix():
            return ModelSource(spec=spec, kind="local", path=path.parent.resolve(),
                               gguf_file=path.name)
        if not path.is_dir():
            raise InputError(f"model '{spec}' is a file; give the checkpoint directory or a "
                             ".gguf file instead")
        from invarlock.models.gguf_file import choose_gguf

        has_config = (path / "config.json").is_file()
        chosen = choose_gguf(path, gguf_file, spec) if gguf_file or not has_config else None
        if chosen is not None:
            return ModelSource(spec=spec, kind="local", path=path.resolve(), gguf_file=chosen)
        if not has_config:
            raise InputError(f"model directory '{spec}' has no config.json")
        return ModelSource(spec=spec, kind="local", path=path.resolve())
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise InputError(f"model directory '{spec}' does not exist")
    return _resolve_hub(spec, spec, revision, allow_pickle)


def _demo_dir() -> Path:
    try:
        from invarlock import demo
    except ImportError as exc:
        raise InputError("the bundled demo model is missing from this installation") from exc
    path = Path(demo.model_dir())
    if not (path / "config.json").is_file():
        raise InputError(f"the bundled demo model at {path} is incomplete (no config.json)")
    return path


def _resolve_hub(spec: str, repo_id: str, revision: str | None, allow_pickle: bool) -> ModelSource:
    if not _HUB_ID.match(repo_id):
        raise InputError(f"'{repo_id}' is not a valid Hugging Face Hub model id")
    if network_allowed():
        path = _download(repo_id, revision, allow_pickle)
    else:
        enforce_offline()
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        if not isinstance(cached, str):
            raise InputError(
                f"model '{spec}' is not a local directory and network access is off; "
                f"set {NETWORK_ENV}=1 to download it from the Hugging Face Hub"
            )
        path = Path(cached).parent
        logger.info("using cached hub model %s from %s", repo_id, path)
    return ModelSource(spec=spec, kind="hub", path=path, hub_id=repo_id, revision=revision)


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [*_HUB_PATTERNS, "*.bin"] if allow_pickle else list(_HUB_PATTERNS)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # hub errors (HTTP, auth, missing repo) are user-facing input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = f"cannot download model '{repo_id}' from the Hugging Face Hub: {first}"
        raise InputError(message) from exc


def _directory(source: ModelSource | Path | str) -> Path:
    path = source.path if isinstance(source, ModelSource) else Path(source)
    if path is None:
        raise InputError(f"model '{source}' has no local directory")
    return path


def gguf_file_suffix() -> str:
    return ".gguf"


def gguf_path(source: ModelSource | Path | str) -> Path | None:
    """The GGUF file of a GGUF source, else None."""
    if isinstance(source, ModelSource) and source.gguf_file and source.path is not None:
        return source.path / source.gguf_file
    return None


def read_config(source: ModelSource | Path | str) -> dict:
    """config.json as a dict; refuses checkpoints that need the repository's own code.

    A GGUF source's config is the one transformers builds from the file's metadata.
    """
    gguf = gguf_path(source)
    if gguf is not None:
        from invarlock.models.gguf_file import gguf_info

        return dict(gguf_info(gguf).config)
    path = _directory(source) / "config.json"
    config = _read_json(path, "model config", MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise InputError(f"{path} must hold a JSON object")
    _refuse_remote_code(config, path)
    return config


MAX_CONFIG_BYTES = 16 * 2**20   # config.json with a large label map is a few MiB
MAX_INDEX_BYTES = 64 * 2**20    # a shard index names every tensor once


def _read_json(path: Path, what: str, limit: int) -> Any:
    """A JSON file of a checkpoint: a regular file within `limit`, parsed, one line if not."""
    from invarlock.input_files import read_text

    text = read_text(path, what, limit)
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{path} is nested too deeply to be a {what}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _refuse_remote_code(config: dict, path: Path) -> None:
    """A config with ``auto_map`` and a model_type transformers lacks needs remote code."""
    if "auto_map" not in config:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config.get("model_type") in CONFIG_MAPPING_NAMES:
        logger.info("%s has auto_map; using the built-in %s classes", path, config["model_type"])
        return
    raise InputError(
        f"{path} needs custom model code from its repository (auto_map, model_type "
        f"'{config.get('model_type')}'); InvarLock never runs remote code, so this model is "
        "not supported"
    )


def _adapter_from_architecture(architecture: str) -> AdapterKind | None:
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return AdapterKind.CAUSAL_LM
    if architecture.endswith("ForMaskedLM"):
        return AdapterKind.MASKED_LM
    if architecture.endswith("ForSequenceClassification"):
        return AdapterKind.SEQ_CLS
    return None


def detect_adapter(config: dict, requested: str = "auto") -> AdapterKind:
    """The adapter for a checkpoint: from ``architectures``, else ``model_type``.

    An explicit adapter (or alias such as hf_llama) must agree with a recognised
    architecture; loading a classifier as a language model would score random heads.
    """
    choice = (requested or "auto").strip().lower()
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else None
    plugin = plugins.adapter_plugin_for(config, choice)
    if plugin is not None:  # an installed adapter plugin claims this architecture
        return plugin.kind
    if choice != "auto" and choice not in ADAPTER_ALIASES:
        plugin_names = plugins.adapter_plugin_names()
        if choice in plugin_names:
            raise InputError(f"adapter plugin '{choice}' does not handle architecture "
                             f"{architecture}")
        names = ", ".join(["auto", *ADAPTER_ALIASES, *plugin_names])
        raise InputError(f"unknown adapter '{requested}'; choose one of: {names}")
    detected = _adapter_from_architecture(architecture) if architecture else None
    model_type = str(config.get("model_type", ""))
    if choice != "auto":
        wanted = ADAPTER_ALIASES[choice]
        if detected is not None and detected is not wanted:
            raise InputError(
                f"adapter '{requested}' does not fit architecture {architecture} "
                f"(which is {detected.value}); use --adapter auto"
            )
        return wanted
    if detected is not None:
        return detected
    if architecture is None and model_type in _CAUSAL_TYPES:
        return AdapterKind.CAUSAL_LM
    if architecture is None and model_type in _MLM_TYPES:
        return AdapterKind.MASKED_LM
    what = f"architecture '{architecture}'" if architecture else f"model_type '{model_type}'"
    raise InputError(
        f"cannot tell how to score {what}: supported are causal LMs (*ForCausalLM, "
        "*LMHeadModel), masked LMs (*ForMaskedLM) and sequence classifiers "
        "(*ForSequenceClassification); pass --adapter to choose, or install an adapter "
        "plugin that handles it (see `invarlock plugins adapters`)"
    )


def weight_files(source: ModelSource | Path | str, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint's weight files: safetensors (single or sharded), else vetted pickles.

    Pickle files can run code when unpickled, so they are used only with ``allow_pickle``
    (and are then loaded with torch's weights-only unpickler).
    """
    gguf = gguf_path(source)
    if gguf is not None:
        return [gguf]
    directory = _directory(source)
    for single, index in ((SAFETENSORS_FILE, SAFETENSORS_INDEX), (PICKLE_FILE, PICKLE_INDEX)):
        files = _weights_in(directory, single, index)
        if not files:
            continue
        if single == PICKLE_FILE and not allow_pickle:
            raise InputError(
                f"model '{source}' has only pickle weights ({files[0].name}); unpickling can "
                "run arbitrary code, so pickles are refused unless you pass --allow-pickle "
                "(they are then loaded with torch weights_only=True)"
            )
        return files
    other = sorted(p.name for p in directory.glob("*") if p.suffix in {".pt", ".pth"})
    found = f" (found {', '.join(other)}; convert to safetensors)" if other else ""
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    if ggufs:
        found = (f" (found {', '.join(ggufs)}: give the .gguf file, or the folder with "
                 "--gguf-file NAME, to certify it as a GGUF model)")
    raise InputError(
        f"model '{source}' has no weights: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}"
        f"{found}"
    )


def _weights_in(directory: Path, single: str, index: str) -> list[Path]:
    if (directory / single).is_file():
        return [directory / single]
    index_path = directory / index
    if not index_path.is_file():
        return []
    index = _read_json(index_path, "shard index", MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise InputError(f"{index_path} is not a valid shard index: it needs a non-empty "
                         "\"weight_map\" object of tensor name → shard file name")
    shards = sorted(set(weight_map.values()))
    outside = [name for name in shards if Path(name).name != name or name in ("", ".", "..")]
    if outside:
        raise InputError(f"{index_path} names shard '{outside[0][:80]}' outside its folder; "
                         "shards are file names next to the index")
    missing = [name for name in shards if not (directory / name).is_file()]
    if missing:
        raise InputError(f"{index_path} names missing shard(s): {', '.join(missing[:3])}")
    return [index_path, *(directory / name for name in shards)]


class _FileState(NamedTuple):
    """What changes when a file is replaced or written."""

    device: int
    inode: int
    size: int
    mtime_ns: int


SETTLED_NS = 2_000_000_000  # files unmodified this long before hashing may be remembered
_DIGESTS: dict[tuple[tuple[str, _FileState], ...], str] = {}


def weights_digest(files: list[Path]) -> str:
    """Digest of the weight files (`hashing.tree_sha256`): files sorted by name, each as its
    name, NUL and size (8 bytes, little-endian), then its pieces.

    A run reads the baseline's digest twice (its cache key, then its load). The second time
    comes from memory when every file still has the same identity, size and modification
    time, and had not been modified for a while before it was hashed (a write within the
    file system's timestamp granularity could otherwise keep the modification time)."""
    from invarlock.models.hashing import file_pieces, tree_sha256

    ordered = sorted(files, key=lambda p: p.name)
    states = [_state(path) for path in ordered]
    key = tuple((str(path.absolute()), state) for path, state in zip(ordered, states,
                                                                        strict=True))
    if key in _DIGESTS:
        return _DIGESTS[key]
    started = time.time_ns()

    def parts() -> Iterator[bytes | Callable[[], bytes]]:
        for path, state in zip(ordered, states, strict=True):
            yield path.name.encode("utf-8") + b"\0" + state.size.to_bytes(8, "little")
            yield from file_pieces(path, state.size)

    try:
        text = tree_sha256(parts())
    except OSError as exc:
        raise InputError(f"cannot read the weights: {exc.strerror or exc}") from None
    if all(state.mtime_ns < started - SETTLED_NS for state in states):
        while len(_DIGESTS) >= 16:
            _DIGESTS.pop(next(iter(_DIGESTS)))
        _DIGESTS[key] = text
    return text


def _state(path: Path) -> _FileState:
    stat = path.stat()
    return _FileState(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def context_length(config: dict) -> int | None:
    """Longest input the model accepts, from the usual config fields (None when unknown)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
