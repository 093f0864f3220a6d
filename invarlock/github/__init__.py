"""The GitHub Action side of InvarLock: certify in a workflow, then report to GitHub.

Data flows one way: `settings` (environment, read once) → `certifier` (run `invarlock
certify`, or load a downloaded result in publish mode) → `Outcome` → `render` (pure
Markdown) → `publish` (check run, sticky comment) plus the runner files (`outputs`,
`summary`). `main.run` is the only place that catches errors and picks the exit code.
"""
