"""`invarlock plugins` and the entry-point registry: a third-party distribution adds an
adapter, an edit and a guard without touching InvarLock, and `certify` uses them.

The example distribution lives in tests/plugin_pkg; it is installed for real (pip builds and
installs it with --target into a temporary directory), then put on sys.path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from invarlock import guards, plugins
from invarlock.certificate import document
from invarlock.cli import main
from invarlock.enums import AdapterKind
from invarlock.errors import InputError
from invarlock.models.source import detect_adapter

PLUGIN_PKG = Path(__file__).resolve().parent / "plugin_pkg"
FAST = "dataset: {seq_len: 64, preview_n: 8, final_n: 8}\neval: {bootstrap: {replicates: 100}}\n"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """The example plugin, installed by pip into its own directory."""
    site = tmp_path_factory.mktemp("plugin-site")
    build = tmp_path_factory.mktemp("plugin-src")
    shutil.copytree(PLUGIN_PKG, build / "pkg")  # pip writes build files next to the source
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site),
                    str(build / "pkg")], check=True, capture_output=True, text=True)
    assert (site / "invarlock_acme").is_dir()
    return site


@pytest.fixture
def installed(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    plugins.refresh()
    yield plugin_site
    plugins.refresh()
    guards.unregister("acme_norm")  # registration is process-wide


@pytest.fixture(autouse=True)
def _fresh_registry():
    plugins.refresh()
    yield
    plugins.refresh()


def listing(*args: str) -> dict:
    result = CliRunner().invoke(main, ["plugins", *args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_builtins_are_listed_with_their_origin():
    components = listing()["components"]
    names = {(c["kind"], c["name"]): c for c in components}
    assert {("adapters", "hf_causal"), ("adapters", "hf_mlm"), ("adapters", "hf_seq_cls"),
            ("edits", "quant_rtn")} <= set(names)
    causal = names[("adapters", "hf_causal")]
    assert causal["origin"] == "builtin" and "hf_gpt2" in causal["aliases"]
    assert all(c["origin"] == "builtin" for c in components)


def test_installed_plugin_is_listed_with_distribution_and_version(installed):
    adapters = {c["name"]: c for c in listing("adapters")["components"]}
    acme = adapters["acme_causal"]
    assert (acme["origin"], acme["version"]) == ("invarlock-acme-plugin", "0.1.0")
    assert acme["target"] == "invarlock_acme.adapter:ADAPTER" and acme["error"] is None
    assert "AttributeError" in adapters["acme_broken"]["error"]  # listed, never used
    edits = {c["name"]: c for c in listing("edits")["components"]}
    assert edits["acme_scale"]["origin"] == "invarlock-acme-plugin"
    text = CliRunner().invoke(main, ["plugins", "adapters"]).stdout
    assert "acme_causal" in text and "UNUSABLE" in text and "invarlock-acme-plugin 0.1.0" in text


def test_adapter_plugin_claims_its_architecture(installed):
    config = {"architectures": ["AcmeLM"], "model_type": "gpt2"}
    assert detect_adapter(config) is AdapterKind.CAUSAL_LM
    assert detect_adapter(config, "acme_causal") is AdapterKind.CAUSAL_LM
    with pytest.raises(InputError, match="does not handle architecture GPT2LMHeadModel"):
        detect_adapter({"architectures": ["GPT2LMHeadModel"]}, "acme_causal")


def test_without_the_plugin_the_architecture_is_unknown():
    with pytest.raises(InputError, match="install an adapter plugin"):
        detect_adapter({"architectures": ["AcmeLM"], "model_type": "acme"})


def _acme_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = ["AcmeLM"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _certify(tmp_path: Path, *args: str) -> tuple[int, dict]:
    preset = tmp_path / "fast.yaml"
    preset.write_text(FAST)
    result = CliRunner().invoke(main, ["certify", *args, "--profile", "dev", "--preset",
                                       str(preset), "--no-cache", "--json", "--out",
                                       str(tmp_path / "out")], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout.strip().splitlines()[-1])


def test_certify_loads_a_plugin_architecture_through_the_plugin(installed, tiny_gpt2_dir,
                                                                sonnets_path, tmp_path):
    model = _acme_checkpoint(tiny_gpt2_dir, tmp_path / "acme")
    from invarlock_acme import adapter as acme

    before = len(acme.LOADS)
    code, summary = _certify(tmp_path, "--baseline", str(model), "--subject", str(model),
                             "--dataset", str(sonnets_path))
    assert code == 0, summary
    assert len(acme.LOADS) - before == 2  # baseline and subject both came through the plugin
    cert = document.load_certificate(summary["certificate"])
    assert cert["baseline"]["architecture"] == "AcmeLM"
    assert cert["primary_metric"]["ratio"] == 1.0
    assert cert["environment"]["libraries"]["invarlock-acme-plugin"] == "0.1.0"


def test_certify_applies_an_edit_plugin(installed, tiny_gpt2_dir, sonnets_path, tmp_path):
    edit = tmp_path / "edit.yaml"
    edit.write_text("edit: {name: acme_scale, plan: {factor: 0.001}}\n")
    code, summary = _certify(tmp_path, "--baseline", str(tiny_gpt2_dir), "--edit-config",
                             str(edit), "--dataset", str(sonnets_path))
    assert code == 0, summary
    cert = document.load_certificate(summary["certificate"])
    assert cert["edit"]["name"] == "acme_scale" and cert["edit"]["plan"] == {"factor": 0.001}
    assert cert["environment"]["libraries"]["invarlock-acme-plugin"] == "0.1.0"
    assert cert["edit"]["modules_changed"]


def test_edit_plugin_plans_are_checked_by_the_plugin(installed, tiny_gpt2_dir, tmp_path):
    edit = tmp_path / "edit.yaml"
    edit.write_text("edit: {name: acme_scale, plan: {factr: 0.1}}\n")
    code, summary = _certify(tmp_path, "--baseline", str(tiny_gpt2_dir), "--edit-config",
                             str(edit), "--dataset", "demo")
    assert code == 2 and "factr" in summary["error"]


def test_unknown_edit_names_the_available_ones(installed, tiny_gpt2_dir, tmp_path):
    code, summary = _certify(tmp_path, "--baseline", str(tiny_gpt2_dir), "--edit", "nope",
                             "--dataset", "demo")
    assert code == 2 and "acme_scale" in summary["error"] and "quant_rtn" in summary["error"]


# --- a guard plugin runs in certify and is re-checked by verify -----------------------------

GUARDED = """
dataset: {seq_len: 64, preview_n: 8, final_n: 8}
eval: {bootstrap: {replicates: 100}}
guards:
  order: [invariants, spectral, rmt, variance, acme_norm, invariants]
  acme_norm: {mode: gate, max_relative_change: LIMIT}
"""


def _guarded_certify(tmp_path: Path, model: Path, data: Path, limit: float) -> tuple[int, dict]:
    preset = tmp_path / f"guarded-{limit}.yaml"
    preset.write_text(GUARDED.replace("LIMIT", str(limit)))
    result = CliRunner().invoke(main, [
        "certify", "--baseline", str(model), "--edit", "quant_rtn", "--dataset", str(data),
        "--profile", "dev", "--preset", str(preset), "--no-cache", "--json", "--out",
        str(tmp_path / f"out-{limit}")], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout.strip().splitlines()[-1])


def test_guard_plugin_is_listed_as_a_guard(installed):
    guards = {c["name"]: c for c in listing("guards")["components"]}
    assert guards["acme_norm"]["origin"] == "invarlock-acme-plugin"
    assert guards["acme_norm"]["error"] is None
    assert guards["spectral"]["origin"] == "builtin"


def test_guard_plugin_runs_in_certify_and_verifies(installed, tiny_gpt2_dir, sonnets_path,
                                                   tmp_path, monkeypatch):
    from invarlock.verify import verify_certificate

    code, summary = _guarded_certify(tmp_path, tiny_gpt2_dir, sonnets_path, 0.05)
    assert code == 0, summary
    cert = document.load_certificate(summary["certificate"])
    section = cert["guards"]["acme_norm"]
    assert section["passed"] is True and section["measurements"]["modules"]
    assert "acme_norm_stable" in cert["gating"]
    assert verify_certificate(cert).differences == ()

    code, summary = _guarded_certify(tmp_path, tiny_gpt2_dir, sonnets_path, 0.0)
    assert code == 1 and any(r.startswith("acme_norm_stable") for r in summary["reasons"])

    guards.unregister("acme_norm")  # an auditor without the plugin cannot re-check it
    monkeypatch.setattr(plugins, "register_guard_plugins", lambda: None)
    report = verify_certificate(cert)
    assert any("cannot re-check guard acme_norm" in d for d in report.differences)
