"""The light install: verify, report, plugins, version and doctor work without torch,
transformers or datasets; model commands name the extra to install and exit 2.

The fast test runs the CLI in a subprocess where those libraries cannot be imported. The slow
one builds the wheel, installs it into a fresh virtualenv with only the core dependencies,
and runs the commands there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.certs import synthetic_certificate

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("certify", "run", "verify", "report", "doctor", "plugins", "version")
HEAVY = ("torch", "transformers", "datasets", "tokenizers", "safetensors", "huggingface_hub",
         "accelerate")

# Runs each argv through the CLI in one process where HEAVY modules cannot be imported, and
# prints one JSON object: exit code and output per command, plus what got imported. Every
# import finder is wrapped so that it does not see them, as in an environment without them:
# `import torch` fails and `find_spec("torch")` is None (no `None` placeholders in
# sys.modules, which libraries probing for torch, such as scipy's array API layer, trip over).
_DRIVER = """
import json, sys
class Hidden:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {heavy!r}:
            return None
        return self.finder.find_spec(name, path, target)
    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()
sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
from click.testing import CliRunner
from invarlock.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, argv)
    results.append({{"argv": argv, "code": r.exit_code, "stdout": r.stdout,
                    "stderr": r.stderr}})
loaded = sorted(n for n in {heavy!r} if sys.modules.get(n) is not None)
print(json.dumps({{"results": results, "loaded": loaded}}))
"""


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("light") / "evaluation.cert.json"
    path.write_text(json.dumps(synthetic_certificate(shift=0.0, seed=1)), encoding="utf-8")
    return path


def _commands(cert: Path, out: Path, model: Path) -> list[list[str]]:
    commands = [
        ["version"],
        ["plugins", "--json"],
        ["verify", str(cert), "--json"],
        ["report", str(cert), "--format", "html", "-o", str(out / "r.html")],
        ["report", str(cert), "--format", "json"],
        ["certify", "--baseline", "x", "--edit", "quant_rtn", "--dataset", "demo", "--json"],
        ["run", "-c", str(out / "run.yaml"), "--json"],
        ["doctor", "--baseline", str(model), "--edit", "quant_rtn", "--dataset",
         str(ROOT / "tests" / "data" / "sonnets.txt"), "--json"],
    ]
    return commands + [[name, "--help"] for name in COMMANDS] + [["--help"]]


def _check(results: list[dict], out: Path, *, really_absent: bool) -> None:
    helps = [r for r in results if r["argv"][-1] == "--help"]
    assert len(helps) == len(COMMANDS) + 1
    for r in helps:  # every command explains itself with examples, torch or not
        assert r["code"] == 0 and "Examples:" in r["stdout"], r
    by = {r["argv"][0] + ("-" + r["argv"][-1] if r["argv"][0] == "report" else ""): r
          for r in results if r["argv"][-1] != "--help"}
    assert by["version"]["code"] == 0 and by["version"]["stdout"].startswith("invarlock ")
    if really_absent:  # version reads installed metadata, which blocking imports leaves
        assert "torch not installed" in by["version"]["stdout"]
    assert by["plugins"]["code"] == 0
    assert {c["name"] for c in json.loads(by["plugins"]["stdout"])["components"]} >= {
        "hf_causal", "quant_rtn"}
    assert by["verify"]["code"] == 0
    assert json.loads(by["verify"]["stdout"])["certificates"][0]["verified"] is True
    assert by["report-" + str(out / "r.html")]["code"] == 0
    assert (out / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert json.loads(by["report-json"]["stdout"])["verification"]["verified"] is True
    for name in ("certify", "run"):
        r = by[name]
        assert r["code"] == 2, r
        error = json.loads(r["stdout"])["error"]
        assert "needs the 'hf' extra" in error and 'pip install "invarlock[hf]"' in error
        assert "Traceback" not in r["stderr"]
    payload = json.loads(by["doctor"]["stdout"])
    found = [f["code"] for f in payload["findings"]]
    assert "INVARLOCK:D018" in found and found[-1] == "INVARLOCK:D060"
    assert by["doctor"]["code"] == 2


def test_core_commands_work_when_model_libraries_cannot_be_imported(certificate, tmp_path,
                                                                    tiny_gpt2_dir):
    (tmp_path / "run.yaml").write_text("model: {id: ./m}\nedit: {name: quant_rtn}\n"
                                       "dataset: {provider: demo}\n")
    argv = json.dumps(_commands(certificate, tmp_path, tiny_gpt2_dir))
    proc = subprocess.run([sys.executable, "-c", _DRIVER.format(heavy=HEAVY), argv],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert payload["loaded"] == []
    _check(payload["results"], tmp_path, really_absent=False)


def test_the_cli_reference_covers_every_command_and_option():
    from invarlock.cli import main

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert set(COMMANDS) <= set(main.commands)
    for name, command in main.commands.items():
        assert f"## `invarlock {name}`" in text, name
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help":
                    assert re.search(rf"[\s`/\[]{re.escape(opt)}\b", text), f"{name} {opt}"


@pytest.mark.slow
def test_wheel_in_a_fresh_virtualenv_without_torch(certificate, tmp_path, tiny_gpt2_dir):
    """pip install invarlock (core dependencies only), then the auditor's commands."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    wheel = next(wheels.glob("invarlock-*.whl"))
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", str(wheel)], check=True, env=clean_env)
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                               capture_output=True, text=True, check=True, env=clean_env)
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert not names & {"torch", "transformers", "datasets", "tokenizers", "safetensors"}
    (tmp_path / "run.yaml").write_text("model: {id: ./m}\nedit: {name: quant_rtn}\n"
                                       "dataset: {provider: demo}\n")
    driver = _DRIVER.format(heavy=())
    argv = json.dumps(_commands(certificate, tmp_path, tiny_gpt2_dir))
    proc = subprocess.run([str(python), "-c", driver, argv], capture_output=True, text=True,
                          cwd=tmp_path, env=clean_env, check=True)
    _check(json.loads(proc.stdout.strip().splitlines()[-1])["results"], tmp_path,
           really_absent=True)
