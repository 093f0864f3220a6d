"""Command line: certify, run, verify, report, doctor, plugins, version.

The CLI is the only place (with the Action entrypoint) that turns exceptions into exit codes:
0 PASS, 1 FAIL, 2 bad input or configuration, 3 evidence cannot be produced. Errors are one
line on stderr; with `--json` stdout carries exactly one JSON object whatever happens.

The commands live in `invarlock.commands`, one module per group; this module is the console
entry (`invarlock.cli:main`) and only assembles them.
"""

from __future__ import annotations

import click

from invarlock import __version__
from invarlock.commands import calibrate, certify, doctor, info, verify
from invarlock.commands.certify import human_summary as _human_summary  # kept for callers
from invarlock.commands.common import (
    EXIT_EVIDENCE,
    EXIT_FAIL,
    EXIT_INPUT,
    EXIT_PASS,
    CommandGroup,
    strict_json,
)

__all__ = ["EXIT_EVIDENCE", "EXIT_FAIL", "EXIT_INPUT", "EXIT_PASS", "_human_summary", "main",
           "strict_json"]


@click.group(cls=CommandGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="invarlock")
def main() -> None:
    """InvarLock: certify that an edited checkpoint is still as good as its baseline.

    \b
    Examples:
      invarlock certify                       # bundled demo: INT8 edit of a small model
      invarlock certify --baseline models/base --subject models/int8 --dataset data.txt
      invarlock certify --baseline models/base --edit quant_rtn --edit-config int4.yaml \\
          --dataset hf:wikitext:wikitext-2-raw-v1:validation --profile release --json
      invarlock run -c run.yaml                 # the same, from a config file
      invarlock doctor -c run.yaml              # preflight: would that run work?
      invarlock verify runs/int8                # re-check a certificate without models
      invarlock report runs/int8 -o int8.html   # render it for people

    \b
    Environment: INVARLOCK_ALLOW_NETWORK=1 allows downloads; INVARLOCK_CACHE_DIR holds the
    baseline cache; INVARLOCK_DEBUG=1 shows tracebacks. Reference: docs/cli.md.
    """


for command in (info.version, certify.certify, verify.verify, verify.report, info.plugins,
                doctor.doctor, certify.run, calibrate.calibrate):
    main.add_command(command)
