"""What several stages share: the sequential design, the guard run and its taps, scoring one
side's windows (torch, or llama.cpp for a GGUF side), device-map placement, freeing memory
and pairing two sides' results."""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np

from invarlock import gate, sequential_run
from invarlock.data.windows import WindowSet
from invarlock.stages.records import CertifyRequest, EvaluationPlan, RunInputs, Timer
from invarlock.stages.served import served_model


def run_design(inputs: RunInputs, plan: EvaluationPlan) -> Any:
    return sequential_run.design_for(inputs.policy, plan.windows.final.n,
                                     plan.windows.preview.n)


def guard_run(inputs: RunInputs, plan: EvaluationPlan) -> Any:
    from invarlock.guards.measure.run import GuardRun, run_info

    preview_n = sequential_run.preview_needed(run_design(inputs, plan), plan.windows.preview.n)
    return GuardRun(inputs.chain, inputs.policy.values.get("guards") or {},
                    run_info(inputs.kind, inputs.device, plan.windows, inputs.chain,
                             inputs.policy, preview_n=preview_n))


def guard_taps(guards: Any, model: Any, role: str, phase: str) -> list[Any]:
    """The guards' taps for one pass over `model`. Setting one up may read weights (the RMT
    probe's balancing scales), so weights a device map offloaded are brought to the host for
    it, as for every other guard step that reads them."""
    from invarlock.models import loading

    with loading.weights_on_host(model):
        return guards.taps(model, role, phase)


def score(inputs: RunInputs, req: CertifyRequest, timer: Timer, model: Any,
          windows: WindowSet, label: str, taps: Any = None, dist: Any = None) -> Any:
    """One side's per-window results: from the torch model, or, for a GGUF side llama.cpp
    evaluates, from llama.cpp (a torch pass then runs only to feed the guards' taps)."""
    from invarlock import evaluate
    from invarlock.host_memory import keep_heap_warm

    t0 = time.perf_counter()
    keep_heap_warm()
    served = served_model(inputs, req, label, int(windows.input_ids.shape[1]))
    if served is None or taps:
        scores = evaluate.evaluate_windows(model, windows, kind=inputs.kind,
                                           device=inputs.device, batch_size=req.batch_size,
                                           taps=taps or None, progress=req.progress,
                                           distribution=dist)
    if served is not None:
        scores = evaluate.evaluate_with_runtime(served, windows, kind=inputs.kind,
                                                progress=req.progress)
    timer.add(f"{label}_eval_s", t0)
    return scores


def placement(req: CertifyRequest) -> dict[str, Any]:
    """Device-map arguments for load_model (none without --device-map)."""
    if req.device_map is None:
        return {}
    return {"device_map": req.device_map, "max_memory": req.max_memory}


def release_memory() -> None:
    import torch

    from invarlock.host_memory import trim_host_memory

    gc.collect()
    trim_host_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def paired(base: Any, subj: Any) -> gate.PairedArrays:
    return gate.PairedArrays(tokens=np.asarray(base.tokens, dtype=np.int64),
                             baseline=np.asarray(base.values, dtype=np.float64),
                             subject=np.asarray(subj.values, dtype=np.float64))
