"""Helpers shared by the benchmark scripts: the machine's CPU name and BENCHMARKS.md sections."""

from __future__ import annotations

import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform reports."""
    cpu = platform.processor() or platform.machine() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def replace_section(section: str, text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Put ``text`` (starting with the heading ``section``) in place of that section of ``path``."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if section in old:
        head, rest = old.split(section, 1)
        # the section ends at the next "## " heading or marked block (<!-- name:start -->)
        ends = [i for i in (rest.find("\n## "), rest.find("\n<!-- ")) if i >= 0]
        nxt = min(ends) if ends else -1
        new = head + text.rstrip("\n") + "\n" + (rest[nxt:] if nxt >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)
