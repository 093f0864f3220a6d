"""The records the certification stages hand each other (`invarlock.certify`): the request,
each stage's frozen output, and the outcome; plus the run's timer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from invarlock import gate
from invarlock.cache import CacheKey
from invarlock.certificate import markdown, sequential_view
from invarlock.data.corpus import Corpus, DatasetSource
from invarlock.data.windows import WindowPlan
from invarlock.enums import AdapterKind, MetricKind
from invarlock.guards import ChainSettings
from invarlock.outdir import OutputFolder
from invarlock.policy import ResolvedPolicy

SAVED_MODEL_DIR = "model"  # output.save_model: the edited subject goes here, inside out_dir
WINDOW_SETS = ("preview", "final")


@dataclass(frozen=True)
class CertifyRequest:
    """Everything one certification needs, already validated by the caller."""

    config: dict[str, Any]  # merged run config (seed shape); the policy is resolved from it
    baseline: str
    subject: str | None
    edit: dict[str, Any] | None  # the config's `edit` section when the subject is built in memory
    dataset: DatasetSource
    out_dir: Path | None  # None: runs/<run id>
    adapter: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    device_map: str | None = None  # spread each model over devices through accelerate
    max_memory: dict[int | str, int] | None = None  # bytes per device for the device map
    revision: str | None = None
    batch_size: int | None = None
    save_subject: Path | None = None
    write_ve_subject: Path | None = None  # write a VE-corrected copy of the subject here
    save_model: bool = False  # with an edit: save the edited subject to <out_dir>/model on PASS
    save_report: bool = False  # also write the HTML report into the certificate set
    use_cache: bool = True
    cache_dir: Path | None = None
    cache_secret: bytes | None = field(default=None, repr=False)  # signs cache entries
    cache_namespace: Any = None  # invarlock.cache.Namespace; None: the local folder layout
    reference: Any = None  # invarlock.provenance.Reference: origin and digest pins
    progress: bool = False
    edit_impl: Any = None  # an invarlock.edits.Edit to use instead of looking up edit["name"]
    gguf_file: str | None = None  # which GGUF file of a folder holding several
    dequantize: bool = False  # evaluate a quantized subject's float weights (no kernels here)
    save_format: str = "safetensors"  # --save-subject format: safetensors | gguf
    subjects: tuple[str, ...] = ()  # several subjects: `invarlock.subjects.certify_subjects`
    runtime: str = "auto"  # what evaluates a GGUF side: auto | llama.cpp | transformers


@dataclass(frozen=True)
class CertifyOutcome:
    certificate: dict[str, Any]
    path: Path
    markdown_path: Path
    report_path: Path | None = None

    @property
    def verdict(self) -> str:
        return self.certificate["verdict"]["status"]

    def stopped_by(self) -> str | None:
        """Why the final set was not evaluated, when a guard (not the preview) stopped it."""
        guard = markdown.stopped_by(self.certificate)
        return f"{guard} failed before evaluation" if guard else None

    def summary(self) -> dict[str, Any]:
        """The `--json` object: the verdict, the one number and where the evidence is."""
        pm = self.certificate["primary_metric"]
        return {
            "verdict": self.verdict,
            "kind": pm["kind"],
            "ratio": pm["ratio"],
            "ratio_ci": pm["ratio_ci"],
            "delta_ci": pm["delta"]["ci"] if pm["delta"] else None,
            "ci_level": round(1 - pm["bootstrap"]["alpha"], 12) if pm["bootstrap"] else None,
            "gate_value": pm["gate_value"],
            "basis": pm["basis"],
            "limit": pm["limit"],
            "alpha": pm["bootstrap"]["alpha"] if pm["bootstrap"] else None,
            "catastrophic": pm["catastrophic"],
            "reasons": self.certificate["verdict"]["reasons"],
            "guards": {name: {"mode": g["mode"], "passed": g["passed"],
                              "measured": _measured(g)}
                       for name, g in self.certificate["guards"].items()},
            "stopped": self.stopped_by(),
            "sequential": getattr(sequential_view.view(self.certificate), "phrase", None),
            "run_id": self.certificate["run_id"],
            "certificate": str(self.path),
            "markdown": str(self.markdown_path),
            **({"report": str(self.report_path)} if self.report_path else {}),
        }


def _measured(section: dict[str, Any]) -> bool:
    return bool((section.get("measurements") or {}).get("evaluated", True))


@dataclass(frozen=True)
class ModelInput:
    """A checkpoint as resolved before loading: where it is, its config and adapter."""

    source: Any  # invarlock.models.source.ModelSource
    config: dict[str, Any]
    adapter: AdapterKind


@dataclass(frozen=True)
class EditInput:
    """The in-memory edit that builds the subject, its plan already parsed."""

    impl: Any  # invarlock.edits.Edit
    plan: Any


@dataclass(frozen=True)
class RunInputs:
    """Stage 1 output: every input of the run, resolved and checked."""

    run_id: str
    device: str
    baseline: ModelInput
    subject: ModelInput | None  # None: the subject is the baseline with `edit` applied
    edit: EditInput | None
    policy: ResolvedPolicy
    chain: ChainSettings
    tokenizer: Any
    tokenizer_hash: str
    out_dir: Path
    output: OutputFolder  # claimed (created, probed, locked) until the run ends
    subject_tokenizer: str | None = None  # where the subject's tokenizer came from
    subject_tokenizer_hash: str | None = None  # None: an in-memory edit keeps the baseline's
    served: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    # ^ llama.cpp models open for this run, by their settings (see `stages.common.score`)

    @property
    def kind(self) -> MetricKind:
        return self.baseline.adapter.metric


@dataclass(frozen=True)
class EvaluationPlan:
    """Stage 2 output: the corpus and the windows both models are scored on."""

    corpus: Corpus
    windows: WindowPlan


@dataclass(frozen=True)
class BaselineEvidence:
    """Stage 3 output: what every subject is compared with; no model is held here."""

    sets: dict[str, Any]  # "preview"/"final" → WindowScores (or the cache's copy)
    parameters: int
    files: list[Path]
    cache_key: CacheKey
    cache_digest: str | None  # digest of the cache payload read or written (None: cache off)
    guard_payload: dict[str, Any]  # baseline guard states, as the cache stores them
    guard_seconds: dict[str, float]  # time the guards spent on the baseline pass
    record: dict[str, Any]  # the certificate's `baseline` section
    scores: Any = None  # invarlock.baseline_run.BaselineScores: `sets`, extended on demand
    resident: Any = None  # stages.baseline._ResidentBaseline: the model while lockstep keeps it


@dataclass(frozen=True)
class PreparedSubject:
    """Stage 4 output: the subject resident for scoring, and what the certificate says of it."""

    loaded: Any  # invarlock.models.loading.LoadedModel
    record: dict[str, Any]
    edit_record: dict[str, Any] | None
    fingerprint: str | None  # tensor digest of an in-memory subject, for the invariants


@dataclass(frozen=True)
class SubjectEvidence:
    """Stage 5 output: the subject's per-window results and every guard's outcome."""

    record: dict[str, Any]  # the certificate's `subject` section
    edit_record: dict[str, Any] | None
    sets: dict[str, Any]  # "preview" → WindowScores, "final" → WindowScores or None
    outcomes: list[Any]  # invarlock.guards.GuardOutcome, chain order
    gating: list[str]  # gating flags the guards add
    ve_scales: dict[str, float] | None  # the VE guard's proposal, when it ran
    guard_seconds: dict[str, float]
    sequential: Any = None  # invarlock.sequential_run.SequentialOutcome when the design ran


@dataclass(frozen=True)
class Judgement:
    """Stage 6 output: the numbers and the verdict."""

    match: float
    primary: gate.PrimaryMetricResult
    decision: gate.Decision
    evidence: gate.Evidence  # the evidence collected against the profile's floor
    distribution: dict[str, Any] | None = None  # the distribution evidence, when measured
    base_sets: dict[str, Any] = field(default_factory=dict)  # the baseline's, cut to the
    # windows the subject was evaluated on: what the certificate pairs


@dataclass
class Timer:
    spans: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.spans[name] = round(self.spans.get(name, 0.0) + time.perf_counter() - start, 4)
