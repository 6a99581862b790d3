"""Where benchmark tables go: printed, and written to benchmarks/results/NAME (gitignored)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def markdown_table(caption: str, header: list[str], rows: list[str]) -> str:
    """A caption line and a markdown table (``rows`` are already formatted ``| ... |`` lines)."""
    return "\n".join([caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows])


def publish(name: str, text: str) -> Path:
    """Print ``text`` and write it to ``benchmarks/results/<name>``."""
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text + "\n")
    return path
