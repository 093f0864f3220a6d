"""GGUF checkpoints evaluated as served: by llama.cpp's own kernels (extra `llamacpp`).

transformers dequantizes a GGUF file to float and runs a float forward that no deployment
runs; llama.cpp (and everything built on it) multiplies the stored blocks by quantized
activations with its own kernels. With this runtime a GGUF side is scored by llama.cpp, on
exactly the token ids of the window plan (ids are fed, never text; no BOS is added), with
logits at every position; the positions scored are those the transformers path scores
(each attended token after the first, predicted from its attended prefix).

The guards keep reading the dequantized view of the same file (effective weights and
activations): only the per-window NLL comes from here. Everything that can change llama.cpp's
numbers (its version, the backends and CPU features it was built with, threads, context,
batch sizes, layers offloaded) is recorded in the certificate's `format.runtime`.
This module imports no torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from invarlock.errors import EvidenceError, InputError, MissingExtraError

logger = logging.getLogger(__name__)

EXTRA = "llamacpp"
ROW_CHUNK = 64  # logits rows turned into losses at a time (float32 temporaries)


class Runtime(StrEnum):
    """What evaluates a GGUF side: `auto` picks llama.cpp when its extra is installed."""

    AUTO = "auto"
    LLAMACPP = "llama.cpp"
    TRANSFORMERS = "transformers"


def parse_runtime(value: str | None) -> Runtime:
    try:
        return Runtime(value or Runtime.AUTO)
    except ValueError:
        raise InputError(f"unknown runtime '{value}'; choose one of "
                         f"{', '.join(r.value for r in Runtime)}") from None


def available() -> bool:
    """llama-cpp-python is importable (checked without loading its shared library)."""
    return importlib.util.find_spec("llama_cpp") is not None


def uses_llamacpp(requested: Runtime, gguf: Path | None, *, edited: bool = False,
                  device: str = "cpu") -> bool:
    """Whether one side is scored by llama.cpp: only a GGUF file can be. `auto` does so when
    the extra is installed, unless the subject is an edit made in memory (both sides of an
    edit share the transformers forward, so that the edit is all that differs) or the device
    is a GPU this llama.cpp was not built for (its CPU would stand in for the GPU asked for)."""
    if gguf is None or requested is Runtime.TRANSFORMERS:
        return False
    if requested is Runtime.LLAMACPP:
        return True
    if not available() or edited:
        return False
    return not _on_gpu(device) or _supports_gpu_offload()


def check_request(requested: Runtime, ggufs: list[Path]) -> None:
    """`--runtime llama.cpp` needs the extra and a GGUF side to evaluate (input errors)."""
    if requested is not Runtime.LLAMACPP:
        return
    if not available():
        raise MissingExtraError("--runtime llama.cpp", EXTRA)
    if not ggufs:
        raise InputError("--runtime llama.cpp evaluates GGUF files, and neither the baseline "
                         "nor the subject is one")


# --- settings and what the certificate records ----------------------------------------------

@dataclass(frozen=True)
class Settings:
    """How one GGUF file is run; every field is recorded (each can change the numbers)."""

    path: Path
    n_ctx: int          # the window length: one window per context, its KV cache cleared after
    n_batch: int        # one window per decode call
    n_ubatch: int
    threads: int        # usable cores (generation and prompt processing alike)
    gpu_layers: int     # 0 on CPU; -1 (every layer) on a GPU device llama.cpp was built for

    @classmethod
    def for_windows(cls, path: Path, seq_len: int, device: str) -> Settings:
        on_gpu = _on_gpu(device)
        gpu = on_gpu and _supports_gpu_offload()
        if on_gpu and not gpu:
            logger.warning("this llama.cpp was built without GPU support: %s runs on the CPU",
                           path.name)
        return cls(path=path, n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len,
                   threads=_usable_cores(), gpu_layers=-1 if gpu else 0)


def runtime_record(settings: Settings) -> dict[str, Any]:
    """The certificate's `format.runtime`: llama.cpp's build and how it was run."""
    info = system_info()
    fields = asdict(settings)
    fields.pop("path")
    return {"name": Runtime.LLAMACPP.value, "version": version(),
            "backends": backends(info), "system_info": info, **fields}


def format_fields(settings: Settings) -> dict[str, Any]:
    """What changes in a GGUF side's `format` record when llama.cpp evaluates it."""
    return {"forward": "quantized-kernels", "backend": Runtime.LLAMACPP.value,
            "backend_version": version(), "runtime": runtime_record(settings)}


def cache_tag(settings: Settings) -> str:
    """What a cached baseline result depends on beyond the transformers path's key."""
    return (f"llama.cpp {version()} {'+'.join(backends(system_info()))} "
            f"t{settings.threads} c{settings.n_ctx} b{settings.n_batch} u{settings.n_ubatch} "
            f"g{settings.gpu_layers}")


def version() -> str | None:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("llama-cpp-python")
    except Exception:  # not installed: the record says so
        return None


def system_info() -> str:
    """llama_print_system_info(): the backends and CPU features llama.cpp was built with."""
    llama_cpp = _import()
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def backends(info: str) -> list[str]:
    """Backend names in a system-info line ("CPU : SSE3 = 1 | ... | CUDA : ARCHS = ...")."""
    return re.findall(r"(?:^|\|)\s*([A-Za-z][\w-]*) : ", info)


# --- scoring ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WindowNLL:
    """One window scored: summed NLL (nats, float64), tokens scored, the ids fed."""

    nll: float
    tokens: int
    finite: bool
    fed: np.ndarray  # int64 [L], exactly what llama.cpp was given


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp, scoring one window at a time."""

    def __init__(self, settings: Settings) -> None:
        llama_cpp = _import()
        self.settings = settings
        try:
            with _quiet():
                self._llm = llama_cpp.Llama(
                    model_path=str(settings.path), n_ctx=settings.n_ctx,
                    n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
                    n_threads=settings.threads, n_threads_batch=settings.threads,
                    n_gpu_layers=settings.gpu_layers, logits_all=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise EvidenceError(f"llama.cpp cannot load '{settings.path.name}': {exc}",
                                hint="--runtime transformers evaluates its dequantized "
                                     "weights instead") from None
        self.n_vocab = int(self._llm.n_vocab())

    def score_causal(self, ids: np.ndarray) -> WindowNLL:
        """NLL of ids[1:] given their prefixes, from llama.cpp's logits at every position."""
        fed = np.ascontiguousarray(ids, dtype=np.int64)
        if fed.size and (fed.min() < 0 or fed.max() >= self.n_vocab):
            raise InputError(f"a window holds token ids outside llama.cpp's vocabulary of "
                             f"{self.n_vocab}")
        if fed.size > self.settings.n_ctx:
            raise InputError(f"a window of {fed.size} tokens exceeds the context of "
                             f"{self.settings.n_ctx}")
        if fed.size < 2:
            return WindowNLL(0.0, 0, True, fed)
        self._llm.reset()  # the next eval drops every cached position: windows are independent
        try:
            self._llm.eval(fed.tolist())
        except RuntimeError as exc:
            raise EvidenceError(f"llama.cpp failed to evaluate a window: {exc}") from None
        logits = self._llm.scores[: fed.size - 1]  # float32 [L-1, V], a view of its buffer
        nll, finite = causal_nll(logits, fed[1:])
        return WindowNLL(nll, int(fed.size - 1), finite, fed)

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()


def causal_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[float, bool]:
    """Summed cross-entropy of rows of ``logits`` [K, V] against ``targets`` [K], and whether
    every row was finite; float32 losses summed in float64, as the transformers path does.

    log-softmax by the max-shifted log-sum-exp, a chunk of rows at a time. A row with NaN or
    +inf anywhere has a non-finite loss: the window is broken, as in the transformers path.
    """
    total = 0.0
    finite = True
    for lo in range(0, targets.shape[0], ROW_CHUNK):
        block = np.asarray(logits[lo:lo + ROW_CHUNK], dtype=np.float32)
        target = targets[lo:lo + ROW_CHUNK]
        with np.errstate(invalid="ignore", over="ignore"):
            top = block.max(axis=1)
            shift = np.where(np.isfinite(top), top, np.float32(0))
            log_z = np.log(np.exp(block - shift[:, None]).sum(axis=1, dtype=np.float32)) + shift
            losses = log_z - block[np.arange(target.shape[0]), target]
        if not np.isfinite(losses).all():
            finite = False
        total += float(losses.astype(np.float64).sum())
    return total, finite


@contextlib.contextmanager
def opened(settings: Settings | None) -> Iterator[LlamaCppModel | None]:
    """A model for the duration of one side's evaluation (None: not a llama.cpp side)."""
    if settings is None:
        yield None
        return
    model = LlamaCppModel(settings)
    try:
        yield model
    finally:
        model.close()


def probe(path: Path, vocab_size: int | None) -> None:
    """Before any evaluation: llama.cpp reads the file's metadata and vocabulary, and its
    vocabulary is the one the windows are cut with (else no id means the same thing)."""
    llama_cpp = _import()
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        with _quiet():
            model = LlamaModel(path_model=str(path), params=params, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"llama.cpp cannot read '{path.name}': {exc}",
                         hint="--runtime transformers evaluates its dequantized weights "
                              "instead") from None
    try:
        n_vocab = int(model.n_vocab())
    finally:
        model.close()
    if vocab_size is not None and n_vocab != vocab_size:
        raise InputError(f"llama.cpp reads a vocabulary of {n_vocab} from '{path.name}', "
                         f"but its config says {vocab_size}")


# --- helpers ----------------------------------------------------------------------------------

def _import() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingExtraError("evaluating GGUF with llama.cpp", EXTRA) from exc
    return llama_cpp


def _on_gpu(device: str) -> bool:
    return device.split(":")[0] in ("cuda", "mps")


def _supports_gpu_offload() -> bool:
    return bool(_import().llama_supports_gpu_offload())


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """llama.cpp logs model loading on stderr from C; keep it off the user's terminal unless
    debug logging is on."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):
        yield
