"""`invarlock run -c CONFIG [-c OVERRIDE ...]`: config files in the seed's shape drive the
same pipeline as `certify`; later files win; the seed README's minimal config runs as written
once its model and dataset point at local files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from invarlock.certificate import document
from invarlock.cli import main
from invarlock.errors import InputError
from invarlock.run_config import config_from_certify_flags, config_from_files

SEED_README = Path("/work/shared/seeds/readme-0.3.3.txt")
# The "Minimal Config" of the seed README (balanced GPT-2, CI profile), verbatim.
SEED_MINIMAL = """\
model:
  id: "<set-your-model-id>" # e.g., gpt2
  adapter: "hf_gpt2"
  device: "cpu"
dataset:
  provider: "wikitext2"
  split: "validation"
  seq_len: 512
  stride: 512
  preview_n: 64
  final_n: 64
  seed: 42
edit:
  # Optional: built-in quant demo. Omit for Compare & Certify/BYOE.
  name: quant_rtn
  plan:
    bitwidth: 8
    per_channel: true
    scope: attn
eval:
  metric:
    kind: ppl_causal
  loss:
    type: causal
guards:
  order: [invariants, spectral, rmt, variance, invariants]
  spectral: { mode: monitor }
  rmt: { mode: monitor }
  variance:
    tap: "post mlp.c_proj (pre-residual)"
    targets: "edited_modules_only"
    discovery: { deadband: 0.02, min_abs_adjust: 0.012, max_scale_step: 0.03 }
    gating: { sided: one-sided, min_effect_lognll: 9e-4 }
auto:
  enabled: true
  tier: balanced
  probes: 0
output:
  dir: runs
  save_model: false
  save_report: true
"""
FAST = "dataset: {seq_len: 64, preview_n: 10, final_n: 10}\neval: {bootstrap: {replicates: 150}}\n"


def run(*args: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(main, ["run", *args, "--json"], catch_exceptions=False)
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stdout
    return result.exit_code, json.loads(lines[0]), result.stderr


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_later_files_win_and_merge_key_by_key(tmp_path):
    base = write(tmp_path / "base.yaml", "model: {id: ./base}\nedit: {name: quant_rtn}\n"
                                         "dataset: {provider: demo, seq_len: 64}\n"
                                         "auto: {tier: balanced, profile: dev}\n")
    over = write(tmp_path / "over.yaml", "auto: {tier: conservative}\n"
                                         "dataset: {preview_n: 9, final_n: 9}\n")
    config = config_from_files([base, over])
    assert config["auto"] == {"tier": "conservative", "profile": "dev"}
    assert config["dataset"] == {"provider": "demo", "seq_len": 64, "preview_n": 9,
                                 "final_n": 9}


def test_the_same_config_through_flags_and_files_is_identical(tmp_path):
    preset = write(tmp_path / "p.yaml", FAST)
    flags = {"presets": (Path(preset),), "baseline": "./base", "edit_name": "quant_rtn",
             "dataset_spec": "demo", "profile": "dev"}
    from_flags = config_from_certify_flags(flags)
    as_file = write(tmp_path / "all.yaml", json.dumps(from_flags))
    assert config_from_files([as_file]) == from_flags


@pytest.mark.parametrize(("text", "message"), [
    ("dataset: {seqlen: 64}\n", "did you mean 'seq_len'"),
    ("outputs: {dir: x}\n", "did you mean 'output'"),
    ("model: {id: ./b}\nedit: {name: quant_rtn}\ndataset: {provider: demo}\n"
     "output: {save_model: maybe}\n", "output.save_model must be boolean"),
    ("model: {id: ./b, subject: ./s}\ndataset: {provider: demo}\noutput: {save_model: true}\n",
     "output.save_model saves the edited subject"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, text, message):
    code, payload, stderr = run("-c", write(tmp_path / "c.yaml", text))
    assert code == 2 and message in payload["error"], payload
    assert "Traceback" not in stderr


def test_exponent_floats_are_numbers_as_in_the_seed_config(tmp_path):
    from invarlock.config import load_yaml

    path = write(tmp_path / "f.yaml", "a: 9e-4\nb: 1E+3\nc: -2.5e-1\nd: '9e-4'\ne: 12\n")
    assert load_yaml(path) == {"a": 9e-4, "b": 1000.0, "c": -0.25, "d": "9e-4", "e": 12}


def test_no_config_file_is_an_error():
    with pytest.raises(InputError, match="at least one config"):
        config_from_files([])


def test_run_and_certify_produce_the_same_evidence(tiny_gpt2_dir, sonnets_path, tmp_path):
    preset = write(tmp_path / "fast.yaml", FAST)
    result = CliRunner().invoke(main, [
        "certify", "--baseline", str(tiny_gpt2_dir), "--edit", "quant_rtn", "--dataset",
        str(sonnets_path), "--profile", "dev", "--preset", preset, "--no-cache", "--json",
        "--out", str(tmp_path / "a")], catch_exceptions=False)
    via_certify = json.loads(result.stdout)
    config = write(tmp_path / "run.yaml", f"""
model: {{id: "{tiny_gpt2_dir}"}}
dataset: {{provider: text, path: "{sonnets_path}"}}
edit: {{name: quant_rtn}}
auto: {{profile: dev}}
output: {{dir: "{tmp_path / 'b'}", cache: false, save_report: false}}
""")
    code, via_run, _ = run("-c", config, "-c", preset)
    assert code == result.exit_code == 0
    one = document.load_certificate(via_certify["certificate"])
    two = document.load_certificate(via_run["certificate"])
    for key in ("windows", "primary_metric", "policy", "validation", "verdict", "edit"):
        assert one[key] == two[key], key
    # Real certificates verify: every number recomputes from what they store.
    verified = CliRunner().invoke(main, ["verify", via_certify["certificate"],
                                         via_run["certificate"]])
    assert verified.exit_code == 0, verified.output
    assert (tmp_path / "a" / "evaluation.report.html").is_file()  # save_report defaults on
    assert not (tmp_path / "b" / "evaluation.report.html").exists()
    assert "report" not in via_run


# --- the seed README's minimal config -------------------------------------------------------

def test_seed_minimal_config_matches_the_seed_readme():
    if not SEED_README.is_file():
        pytest.skip("the seed README is not available here")
    text = SEED_README.read_text(encoding="utf-8")
    start = text.index("model:\nid:")
    normalised = re.sub(r"\s+", " ", text[start:text.index("🩺")])
    assert re.sub(r"\s+", " ", SEED_MINIMAL).strip() in normalised


@pytest.fixture(scope="module")
def gpt2_512(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    """A tiny GPT-2 whose context holds the seed's 512-token windows."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tinymodels import _save, _vocab_size

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=_vocab_size(bpe_tokenizer_dir), n_positions=512, n_embd=32,
                     n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return _save(GPT2LMHeadModel(cfg).eval(), bpe_tokenizer_dir,
                 tmp_path_factory.mktemp("gpt2-512"))


@pytest.fixture(scope="module")
def large_corpus(tmp_path_factory, sonnets_path) -> Path:
    """Enough text for the ci profile's 64 + 64 unique windows of 512 tokens."""
    words = np.array(sonnets_path.read_text(encoding="utf-8").split())
    picks = words[np.random.default_rng(0).integers(0, words.size, size=(4000, 12))]
    lines = [" ".join(row) for row in picks]
    path = tmp_path_factory.mktemp("corpus") / "eval.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _seed_config(model: Path, corpus: Path, out: Path) -> str:
    text = SEED_MINIMAL.replace('"<set-your-model-id>"', f'"{model}"')
    # a local text file in place of wikitext2, whose split then names nothing (and is refused)
    text = text.replace('provider: "wikitext2"\n  split: "validation"',
                        f'provider: "text"\n  path: "{corpus}"')
    return text.replace("dir: runs", f'dir: "{out}"')


def test_seed_minimal_config_runs_as_written(gpt2_512, large_corpus, tmp_path):
    out = tmp_path / "runs"
    text = _seed_config(gpt2_512, large_corpus, out).replace("save_model: false",
                                                             "save_model: true")
    config = write(tmp_path / "seed.yaml", text)
    cache = write(tmp_path / "cache.yaml", f'output: {{cache_dir: "{tmp_path / "cache"}"}}\n')
    # 64 + 64 windows are below the ci floor (200 + 200): refused unless explicitly allowed.
    code, payload, _ = run("-c", config, "-c", cache)
    assert code == 2 and "preview_n 64 < 200" in payload["error"], payload
    allow = write(tmp_path / "allow.yaml", "auto: {allow_underpowered: true}\n")
    code, payload, _ = run("-c", config, "-c", cache, "-c", allow)
    assert code == 0, payload
    out = tmp_path / "runs"
    cert = document.load_certificate(out)
    assert cert["policy"]["profile"] == "ci" and cert["policy"]["tier"] == "balanced"
    assert cert["validation"]["evidence_meets_profile"] is False
    assert "evidence_meets_profile" not in cert["gating"]  # it gates in release only
    assert cert["pairing"]["preview_n"] == cert["pairing"]["final_n"] == 64
    assert cert["windows"]["seq_len"] == 512 and cert["edit"]["plan"]["scope"] == "attn"
    assert (out / "evaluation.report.html").is_file()  # save_report: true
    assert (out / "model" / "model.safetensors").is_file()  # save_model: true, and PASS
    assert cert["artifacts"]["saved_subject"] == str(out / "model")
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    assert {"invariants_pass", "spectral_stable", "rmt_stable", "variance_ok"} <= set(
        cert["validation"])  # the seed's guards section took effect


def test_save_model_keeps_nothing_on_fail(tiny_gpt2_dir, sonnets_path, tmp_path):
    config = write(tmp_path / "c.yaml", f"""
model: {{id: "{tiny_gpt2_dir}"}}
dataset: {{provider: text, path: "{sonnets_path}", seq_len: 64, preview_n: 10, final_n: 10}}
edit: {{name: quant_rtn, plan: {{bitwidth: 2, per_channel: false}}}}
eval: {{bootstrap: {{replicates: 150}}, primary_metric: {{ratio_limit: 1.000001}}}}
auto: {{profile: dev}}
output: {{dir: "{tmp_path / 'out'}", save_model: true, cache: false}}
""")
    code, payload, _ = run("-c", config)
    assert code == 1 and payload["verdict"] == "FAIL"
    assert not (tmp_path / "out" / "model").exists()
