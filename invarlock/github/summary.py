"""The job summary: Markdown appended to GITHUB_STEP_SUMMARY, within GitHub's 1 MiB per step."""

from __future__ import annotations

from pathlib import Path

SUMMARY_LIMIT = 1024 * 1024  # bytes per step


def fit_bytes(markdown: str, limit: int, notice: str) -> str:
    """`markdown` cut at a line boundary so that it plus `notice` is at most `limit` bytes."""
    data = markdown.encode("utf-8")
    if len(data) <= limit:
        return markdown
    room = limit - len(notice.encode("utf-8")) - 2
    cut = data[:max(room, 0)].decode("utf-8", errors="ignore")
    cut = cut[: cut.rfind("\n") + 1] if "\n" in cut else ""
    return cut + "\n" + notice


def append_summary(path: Path, markdown: str, *, run_url: str | None) -> None:
    """Append to the step's summary file, truncated (with a link to the run) when too big."""
    link = f" The full certificate is in the run's artifact: {run_url}" if run_url else ""
    text = fit_bytes(markdown, SUMMARY_LIMIT - 1, f"_Summary truncated._{link}") + "\n"
    with Path(path).open("a", encoding="utf-8") as fh:
        fh.write(text)
