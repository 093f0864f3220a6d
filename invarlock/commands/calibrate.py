"""`invarlock calibrate`: guard thresholds from benign reference edits of a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from invarlock.calibration.zoo_run import BENIGN
from invarlock.commands.common import EXIT_PASS, configure_logging, require_hf, run_guarded

_CALIBRATE_EPILOG = """\b
Writes OUT/calibration.yaml (a preset: certify --preset OUT/calibration.yaml), and the
statistics it came from in OUT/calibration.json and OUT/calibration.csv; the reference
certificates stay in OUT/runs/.
\b
Examples:
  invarlock calibrate --out calib/demo
  invarlock calibrate --baseline ./base --dataset ./eval.txt --profile dev --seeds 3 \\
      --out calib/base
"""


@click.command(epilog=_CALIBRATE_EPILOG)
@click.option("--baseline", metavar="MODEL",
              help="Baseline: local directory, hub id (hf:ID), or 'demo' (default).")
@click.option("--dataset", "dataset_spec", metavar="SPEC",
              help="Evaluation text (as for certify); the demo corpus for the demo model.")
@click.option("--profile", type=click.Choice(["dev", "ci", "release"]), default="dev",
              show_default=True, help="Evidence size of each reference run.")
@click.option("--tier", type=click.Choice(["balanced", "conservative", "aggressive"]),
              help="Tier whose budget, quantile rule and sidedness are used (default: balanced).")
@click.option("--preset", "presets", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Config file(s) merged in order (seed shape); flags win.")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Seeds of each seeded reference edit (noise, zoo families).")
@click.option("--edits", type=click.Choice(["rtn8", "noise", "zoo", *BENIGN]), multiple=True,
              help="Reference edits (default: rtn8 and noise); zoo: every benign zoo family, "
                   "seeds 0..N-1 each.")
@click.option("--margin", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Added to each κ.")
@click.option("--quantile", type=click.FloatRange(0.5, 1.0), default=0.95, show_default=True,
              help="Quantile of null RMT deltas for ε.")
@click.option("--epsilon-floor", type=click.FloatRange(min=0), default=0.01,
              show_default=True, help="Added to each ε.")
@click.option("--half-width", type=click.FloatRange(min=0, min_open=True), default=0.001,
              show_default=True, help="Target CI half-width (nats/token) for window sizing.")
@click.option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--batch-size", type=click.IntRange(min=1), help="Windows per forward pass.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for windows and bootstrap.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Folder for the preset, statistics and certificates.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Baseline cache folder (default: OUT/cache).")
@click.option("--resume", is_flag=True,
              help="Reuse reference certificates already in OUT/runs/ (same baseline, edit).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def calibrate(as_json: bool, quiet: bool, **flags: Any) -> None:
    """Calibrate guard thresholds on benign reference edits of a baseline.

    Certifies INT8 RTN and INT8-step noise (one per seed) against the baseline with the
    guards in monitor mode, then sets spectral κ per family (order statistic of |z| with the
    WARN budget split by family size), RMT ε per family (quantile of the null deltas), the
    VE minimum effect and a window count for the target CI half-width.
    """
    configure_logging(quiet)

    def body() -> tuple[int, dict[str, Any] | None]:
        from invarlock.calibration.runner import EDITS, CalibrationRequest, run
        from invarlock.run_config import config_from_certify_flags, request_from_config

        require_hf("invarlock calibrate")
        certify_flags = {k: flags.get(k) for k in (
            "baseline", "dataset_spec", "profile", "tier", "presets", "device", "dtype",
            "batch_size", "seed", "cache_dir")}
        certify_flags["edit_name"] = "quant_rtn"
        config = config_from_certify_flags(certify_flags)
        request = CalibrationRequest(
            base=request_from_config(config, report=False), out_dir=flags["out_dir"],
            seeds=flags["seeds"],
            edits=tuple(flags["edits"]) or EDITS, margin=flags["margin"],
            quantile=flags["quantile"], epsilon_floor=flags["epsilon_floor"],
            half_width=flags["half_width"], resume=flags["resume"])
        outcome = run(request)
        if not as_json:
            click.echo(f"calibrated on {len(outcome.calibration.rows)} reference runs")
            click.echo(f"preset: {outcome.yaml_path}")
            click.echo(f"statistics: {outcome.json_path}, {outcome.csv_path}")
        return EXIT_PASS, outcome.summary()

    run_guarded(as_json, body)
