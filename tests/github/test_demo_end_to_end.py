"""End to end: the entrypoint runs the real `invarlock certify` on the bundled demo model and
reports to the API stand-in — an INT8 edit (PASS), then a 2-bit edit (FAIL) that updates the
same comment. Profile dev keeps both runs small."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from tests.github.conftest import ROOT, TOKEN, payload, step_environment

HEAD_SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


def _certify(tmp_path: Path, standin, run_id: str, **inputs: str) -> tuple[int, dict, str]:
    step = step_environment(tmp_path, standin.url, "pull_request",
                            payload("pull_request__synchronize.payload.json"),
                            github_token=TOKEN, profile="dev", **inputs)
    step.env.update({
        "GITHUB_RUN_ID": run_id,
        # the documented way to pick the interpreter that runs the certifier
        "INVARLOCK_CERTIFY_COMMAND": shlex.join([sys.executable, "-m", "invarlock", "certify"]),
        "INVARLOCK_CACHE_DIR": str(tmp_path / "baseline-cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GITHUB_WORKSPACE": str(tmp_path),
    })
    done = subprocess.run([sys.executable, str(ROOT / "entrypoint")], env=step.env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    return done.returncode, step.outputs, done.stdout + done.stderr


def test_demo_int8_passes_then_2_bit_fails_and_updates_the_comment(tmp_path, standin):
    code, outputs, log = _certify(tmp_path, standin, "1")
    assert code == 0, log
    assert outputs["verdict"] == "PASS"
    assert float(outputs["ratio-ci-upper"]) <= float(outputs["limit"])
    assert standin.calls() == ["checks/create -> 201", "checks/update -> 200",
                               "users/get-authenticated -> 403",
                               "issues/list-comments -> 200", "issues/create-comment -> 201"]
    first = standin.check_runs[min(standin.check_runs)]
    assert (first["head_sha"], first["conclusion"]) == (HEAD_SHA, "success")
    assert "### ✅ InvarLock: PASS" in standin.comments[2][0]["body"]

    edit = tmp_path / "rtn2.yaml"
    edit.write_text("edit: {name: quant_rtn, plan: {bitwidth: 2}}\n")
    standin.reset_log()
    code, outputs, log = _certify(tmp_path, standin, "2", edit_config=str(edit),
                                  output_dir="report-2bit")
    assert code == 1, log
    assert outputs["verdict"] == "FAIL"
    assert standin.calls() == ["checks/create -> 201", "checks/update -> 200",
                               "users/get-authenticated -> 403",
                               "issues/list-comments -> 200", "issues/update-comment -> 200"]
    second = standin.check_runs[max(standin.check_runs)]
    assert (second["head_sha"], second["conclusion"]) == (HEAD_SHA, "failure")
    assert len(standin.comments[2]) == 1
    assert "### ❌ InvarLock: FAIL" in standin.comments[2][0]["body"]
    assert Path(outputs["certificate-path"]).parent == tmp_path / "report-2bit"
    # the failure is annotated on the file that made the subject: the edit config
    update = next(r.body for r in standin.log if r.operation == "checks/update")
    notes = update["output"]["annotations"]
    assert notes and {n["path"] for n in notes} == {"rtn2.yaml"}
    assert all(n["annotation_level"] == "failure" for n in notes)
    assert (tmp_path / "report-2bit" / "evaluation.cert.html").is_file()
