"""Helpers for guard tests: a briefly trained tiny GPT-2, targeted damage, a certify runner,
and the edit zoo's contract on a model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from click.testing import CliRunner

from invarlock.certificate import document
from invarlock.cli import main


def smollm2_dir() -> Path | None:
    """SmolLM2-135M as a local checkpoint (`make smollm2`), or None when absent."""
    import os

    repo = Path(__file__).resolve().parent.parent
    for candidate in (os.environ.get("INVARLOCK_SMOLLM2_DIR"),
                      repo / ".cache" / "models" / "smollm2-135m"):
        if candidate and (Path(candidate) / "model.safetensors").is_file():
            return Path(candidate)
    return None


def demo_dir() -> Path | None:
    """The bundled demo checkpoint, or None when this installation has none."""
    try:
        from invarlock import demo
    except ImportError:
        return None
    path = Path(demo.model_dir())
    return path if (path / "model.safetensors").is_file() else None


FAST = ("dataset: {seq_len: 64, preview_n: 16, final_n: 16}\n"
        "eval: {bootstrap: {replicates: 200}}\n"
        "guards: {calibration_windows: 12}\n")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (a busy machine makes thread pools very slow)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tiny(src: Path, dst: Path, text: Path, steps: int = 60, seed: int = 0) -> Path:
    """A few AdamW steps on `text`, so that the model's loss depends on its activations."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    ids = np.array(tok(text.read_text())["input_ids"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(src)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - 65, 16)
        x = torch.tensor(np.stack([ids[s:s + 64] for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def damaged_copy(src: Path, dst: Path, damage: Callable[[object], None]) -> Path:
    """Save a copy of `src` with `damage(model)` applied to its weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        damage(model)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def output_rows(module: object) -> object:
    """The weight viewed as [out, in] (transformers' Conv1D stores [in, out])."""
    w = module.weight
    return w.T if type(module).__name__ == "Conv1D" else w


def scale_matrix(path: str, factor: float) -> Callable[[object], None]:
    def damage(model: object) -> None:
        model.get_submodule(path).weight.mul_(factor)
    return damage


def outlier_rows(path: str, rows: tuple[int, ...] = (3, 17, 42), size: float = 25.0,
                 seed: int = 0) -> Callable[[object], None]:
    """Replace a few output rows of one weight by large random rows (outlier features)."""
    def damage(model: object) -> None:
        import torch

        w = output_rows(model.get_submodule(path))
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(rows), w.shape[1], generator=gen) * float(w.std()) * size
        w[list(rows)] = noise
    return damage


def rescale_block_outputs(factor: float) -> Callable[[object], None]:
    """Multiply every block output projection (weight and bias) by `factor`."""
    from invarlock.families import block_index, is_block_output_projection

    def damage(model: object) -> None:
        for name, module in model.named_modules():
            if block_index(name) is not None and is_block_output_projection(name) and hasattr(
                    module, "weight"):
                module.weight.mul_(factor)
                if getattr(module, "bias", None) is not None:
                    module.bias.mul_(factor)
    return damage


def unseen_tokens(model_dir: Path, documents: list[str]) -> list[int]:
    """Token ids that tokenizing `documents` (one by one and joined) never produces: rows no
    evaluation window of that text can read."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    seen = set(tok("\n\n".join(documents))["input_ids"])
    for doc in documents:
        seen |= set(tok(doc)["input_ids"])
    return sorted(set(range(len(tok))) - seen - set(tok.all_special_ids))


def window_stream(model_dir: Path, dataset: str) -> object:
    """The dataset's token stream as `certify` cuts it (documents joined by EOS)."""
    from transformers import AutoTokenizer

    from invarlock.data.corpus import load_corpus, parse_dataset_spec
    from invarlock.data.windows import token_stream

    tok = AutoTokenizer.from_pretrained(model_dir)
    corpus = load_corpus(parse_dataset_spec(dataset), labelled=False)
    return token_stream(corpus.documents, tok, tok.eos_token_id)


def window_tokens(cert: dict, stream: object) -> set[int]:
    """Token ids the certificate's preview and final windows contain, cut again from `stream`."""
    import numpy as np

    from invarlock.data.windows import cut_windows

    w = cert["windows"]
    cut = cut_windows(stream, w["seq_len"], w["stride"])
    return set(np.unique(cut[w["preview"]["ids"] + w["final"]["ids"]]).tolist())


def trained_unseen_tokens(cert: dict, stream: object, n: int) -> list[int]:
    """The `n` tokens the windows never contain that the rest of the corpus uses most: rows
    the model was trained on (distinct), which the primary metric never reads."""
    import numpy as np

    counts = np.bincount(stream)
    counts[sorted(window_tokens(cert, stream))] = 0
    return [int(i) for i in np.argsort(-counts, kind="stable")[:n] if counts[i] > 0]


def parameter(model: object, name: str) -> object:
    return dict(model.named_parameters())[name]


def permute_rows(name: str, rows: list[int]) -> Callable[[object], None]:
    """Rotate the given rows of a parameter by one (row i gets row i+1's content)."""
    def damage(model: object) -> None:
        w = parameter(model, name)
        w[rows] = w[rows[1:] + rows[:1]].clone()
    return damage


def zero_rows(name: str, rows: list[int]) -> Callable[[object], None]:
    def damage(model: object) -> None:
        parameter(model, name)[rows] = 0.0
    return damage


def spike_rows(name: str, rows: list[int], factor: float = 8.0) -> Callable[[object], None]:
    def damage(model: object) -> None:
        parameter(model, name)[rows] *= factor
    return damage


def scale_channels(name: str, channels: list[int], factor: float) -> Callable[[object], None]:
    def damage(model: object) -> None:
        parameter(model, name)[channels] *= factor
    return damage


def permute_output_rows(path: str, seed: int = 0) -> Callable[[object], None]:
    """Permute the output rows of one weight (its consumer left as it is): σ is unchanged."""
    def damage(model: object) -> None:
        import torch

        w = output_rows(model.get_submodule(path))
        order = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))
        w.copy_(w[order].clone())
    return damage


def nan_in(path: str) -> Callable[[object], None]:
    def damage(model: object) -> None:
        model.get_submodule(path).weight.view(-1)[7] = float("nan")
    return damage


def certify(*args: str, cache: Path | None = None,
            threads: bool = False) -> tuple[int, dict, dict | None]:
    """Run `invarlock certify --json`; (exit code, summary, certificate or None).

    Tiny models run on one thread; `threads=True` keeps torch's default (real models)."""
    cache_args = ["--cache-dir", str(cache)] if cache else ["--no-cache"]
    with contextlib.nullcontext() if threads else one_thread():
        result = CliRunner().invoke(main, ["certify", *args, *cache_args, "--json"],
                                    catch_exceptions=False)
    summary = json.loads([ln for ln in result.stdout.splitlines() if ln.strip()][-1])
    cert = None
    if summary.get("certificate"):
        cert = document.load_certificate(summary["certificate"])
    return result.exit_code, summary, cert


def check_zoo_edits(fresh: Callable[[], object], *, fold_atol: float, harm_atol: float,
                    not_applicable: frozenset[str] = frozenset()) -> None:
    """Every zoo family on fresh copies of one model: it edits something, the same seed gives
    the same weights, norm folds and sign flips keep the outputs (within `fold_atol`),
    harmful edits change them (beyond `harm_atol`); families in `not_applicable` refuse with
    NotApplicable."""
    import pytest
    import torch

    from invarlock.calibration import zoo

    ids = torch.arange(1, 13)[None, :]
    with torch.no_grad():
        reference = fresh()(input_ids=ids).logits
    for family, fn in {**zoo.BENIGN, **zoo.HARMFUL}.items():
        a, b = fresh(), fresh()
        if family in not_applicable:
            with torch.no_grad(), pytest.raises(zoo.NotApplicable):
                fn(a, 7)
            continue
        with torch.no_grad():
            result = fn(a, 7)
            fn(b, 7)
            out = a(input_ids=ids).logits
        assert result.modules_changed, family
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(),
                                  strict=True):
            assert torch.equal(pa.nan_to_num(), pb.nan_to_num()), (family, name)
        if family.startswith("normfold") or family == "sign_flip":
            assert torch.allclose(out, reference, atol=fold_atol), family
        elif family in zoo.HARMFUL and family != "nan":
            assert not torch.allclose(out, reference, atol=harm_atol), family


def sketched_spectral_baseline(model: object, windows_dir: Path, text: Path) -> tuple:
    """(probe, windows, tap): a spectral probe bound to the first calibration windows of
    `text` (cut by `windows_dir`'s tokenizer), its baseline measured on `model` with its input
    tap run over those windows; `probe.baseline_state()` then holds the sketches."""
    import numpy as np

    from invarlock.calibration import wholemodel
    from invarlock.enums import MetricKind
    from invarlock.evaluate import evaluate_windows
    from invarlock.guards.measure.probe import RunInfo
    from invarlock.guards.measure.spectral import SpectralProbe

    windows = wholemodel.calibration_windows(windows_dir, text)
    probe = SpectralProbe({})
    probe.bind(RunInfo(kind=MetricKind.PPL_CAUSAL, device="cpu", seed=0,
                       preview_ids=np.zeros(0, dtype=np.int64),
                       calibration_ids=windows.window_ids, replicates=0, ci_alpha=0.05,
                       bootstrap_seed=0))
    probe.baseline_loaded(model)
    (tap,) = probe.taps(model, "baseline", "final")
    evaluate_windows(model, windows, kind=MetricKind.PPL_CAUSAL, device="cpu", batch_size=4,
                     taps=[tap])
    return probe, windows, tap
