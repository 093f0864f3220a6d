"""The CLI's commands, one module per group; `invarlock.cli` assembles them into `main`.

`common` holds what they share (logging, exit codes, error handling); `certify` (certify,
run), `verify` (verify, report), `doctor`, `calibrate` and `info` (version, plugins) each
define their commands as plain click commands.
"""
