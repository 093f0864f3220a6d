"""The sections of `invarlock verify`, one module each, orchestrated by `invarlock.verify`.

`findings` (the report and the tolerant comparison), `document` (digest, policy, layout,
formats), `windows` (per-window arrays), `recompute` (primary metric, evidence, verdict),
`sequential`, `distribution`, `guards` and `baseline` (evidence shared with a reference).
Every module is pure: certificate dicts in, findings out.
"""
