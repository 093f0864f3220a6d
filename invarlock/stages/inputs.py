"""Stage 1: every input resolved and checked before anything is evaluated: models, policy,
guard settings, the dataset, tokenizers, the llama.cpp runtime, the output folder."""

from __future__ import annotations

import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from invarlock import outdir, provenance, sequential_run
from invarlock.data.corpus import DatasetSource
from invarlock.errors import InputError
from invarlock.guards import ChainSettings
from invarlock.policy import resolve
from invarlock.stages.records import CertifyRequest, EditInput, ModelInput, RunInputs, Timer
from invarlock.subject_index import refuse_mixed_results


def validate_inputs(req: CertifyRequest, timer: Timer) -> RunInputs:
    """Resolve models, policy, guard settings, data and tokenizers, and claim the output
    folder; every input error surfaces here, before anything is evaluated.

    On success the output folder is held (locked) for the run: the caller releases it.
    """
    from invarlock.models import device as devices
    from invarlock.models import formats, loading, source, tokenizer

    t = time.perf_counter()
    run_id = new_run_id()
    out_dir = req.out_dir if req.out_dir is not None else Path("runs") / run_id
    for path, what in ((req.save_subject, "--save-subject folder"),
                       (req.write_ve_subject, "--write-ve-subject folder")):
        if path is not None:
            outdir.check_folder_target(path, what)
    check_dataset(req.dataset)
    device = devices.resolve_device(req.device)
    base_src = source.resolve_model_source(req.baseline, revision=req.revision,
                                           gguf_file=req.gguf_file)
    base_cfg = source.read_config(base_src)
    baseline = ModelInput(base_src, base_cfg, source.detect_adapter(base_cfg, req.adapter))
    formats.check_loadable(base_src, base_cfg, device, req.dequantize)
    subject = (check_subject(req.subject, baseline, req, device)
               if req.subject is not None else None)
    if len(req.subjects) <= 1:  # several subjects: each may be the one a flag is for
        formats.check_flags_apply([(m.source, m.config) for m in (baseline, subject) if m],
                                  req.gguf_file, req.dequantize)
    _check_runtime(req, baseline, subject, device)
    policy = resolve(req.config, context_length=source.context_length(base_cfg))
    provenance.check_policy_pin(req.reference, policy.digest)
    provenance.check_baseline_pin(req.reference, lambda: source.weights_digest(
        source.weight_files(base_src, req.allow_pickle)))
    chain = ChainSettings.from_policy(policy.values.get("guards"))  # bad guard config: fail now
    sequential_run.design_for(policy, policy.windows.final_n)  # bad sequential config: too
    edit = _parse_edit(req) if req.edit is not None else None
    _seed_everything(policy.windows.seed)

    base_tok = loading.load_tokenizer(base_src)
    tok_hash = tokenizer.tokenizer_hash(base_tok)
    subject_tokenizer = subj_hash = None
    if subject is not None:
        subject_tokenizer, subj_hash = check_subject_tokenizer(subject, base_tok, tok_hash)
    output = outdir.claim(out_dir, check=lambda folder: refuse_mixed_results(
        folder, req.subjects))  # last: an input error above leaves no folder behind
    timer.add("resolve_s", t)
    return RunInputs(run_id=run_id, device=device, baseline=baseline, subject=subject,
                     edit=edit, policy=policy, chain=chain, tokenizer=base_tok,
                     tokenizer_hash=tok_hash, out_dir=out_dir, output=output,
                     subject_tokenizer=subject_tokenizer, subject_tokenizer_hash=subj_hash)


def check_dataset(dataset: DatasetSource) -> None:
    """A local dataset must be a readable file or folder (read in full at the next stage)."""
    if dataset.provider not in ("text", "jsonl") or dataset.path is None:
        return
    path = Path(str(dataset.path)).expanduser()
    try:
        ok = path.is_file() or path.is_dir()
        readable = os.access(path, os.R_OK)
    except OSError as exc:
        raise InputError(f"dataset {outdir.shown(path)} cannot be used: "
                         f"{exc.strerror or exc}") from None
    if not ok:
        raise InputError(f"dataset {outdir.shown(path)} not found")
    if not readable:
        raise InputError(f"dataset {outdir.shown(path)} is not readable")


def check_subject(spec: str, baseline: ModelInput, req: CertifyRequest,
                  device: str = "cpu") -> ModelInput:
    """Resolve one subject checkpoint; it must be the same kind of model as the baseline,
    and a quantized one must be runnable here (its backend installed, kernels or
    --dequantize)."""
    from invarlock.models import formats, source

    src = source.resolve_model_source(spec, revision=req.revision, gguf_file=req.gguf_file)
    config = source.read_config(src)
    adapter = source.detect_adapter(config, req.adapter)
    if adapter is not baseline.adapter:
        raise InputError(f"baseline is {baseline.adapter} but subject is {adapter}: "
                         "they must be the same kind of model")
    formats.check_same_architecture(baseline.config, config, src, baseline.source)
    formats.check_loadable(src, config, device, req.dequantize)
    subject = ModelInput(src, config, adapter)
    _probe_runtime(req, subject, device, edited=False)
    return subject


def _check_runtime(req: CertifyRequest, baseline: ModelInput,
                   subject: ModelInput | None, device: str) -> None:
    """--runtime: llama.cpp needs its extra and a GGUF side, and reads the baseline's file."""
    from invarlock.models import llamacpp
    from invarlock.models.source import gguf_path

    sides = [baseline] + ([subject] if subject is not None else [])
    ggufs = [p for p in (gguf_path(s.source) for s in sides) if p is not None]
    llamacpp.check_request(llamacpp.parse_runtime(req.runtime), ggufs)
    _probe_runtime(req, baseline, device, edited=req.edit is not None)


def _probe_runtime(req: CertifyRequest, side: ModelInput, device: str, *,
                   edited: bool) -> None:
    """A GGUF side llama.cpp will evaluate must be readable by it: found before evaluating."""
    from invarlock.models import llamacpp
    from invarlock.models.source import gguf_path

    path = gguf_path(side.source)
    if llamacpp.uses_llamacpp(llamacpp.parse_runtime(req.runtime), path, edited=edited,
                              device=device):
        assert path is not None
        vocab = side.config.get("vocab_size")
        llamacpp.probe(path, vocab if isinstance(vocab, int) else None)


def check_subject_tokenizer(subject: ModelInput, base_tok: Any,
                            tok_hash: str) -> tuple[str, str]:
    """The subject must tokenize exactly as the baseline does, or no window pairs up.

    Returns where its tokenizer came from (a GGUF file may embed one, or none) and its hash
    for the invariants guard.
    """
    from invarlock.models import tokenizer

    return tokenizer.check_subject_tokenizer(base_tok, tok_hash, subject.source)


def _parse_edit(req: CertifyRequest) -> EditInput:
    from invarlock.edits import get_edit

    assert req.edit is not None
    impl = req.edit_impl or get_edit(req.edit["name"])
    return EditInput(impl, impl.parse_plan(req.edit))


def new_run_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(4)}"


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
