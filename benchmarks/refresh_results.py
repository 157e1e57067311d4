#!/usr/bin/env python
"""Regenerate the tables of a results page from the results files: nothing is trained.

Each generated block of the page sits between two markers; the opening one holds the
``sgg-optim`` arguments that produce it::

    <!-- report: bench --tasks ... --report -->
    (the command, then its tables, written by this script)
    <!-- /report -->

The script runs each command (which must only read results: ``--report``), keeps the
part of its output from the first line that starts with ``PART`` (default: the protocol
tables; ``--from`` in the marker, e.g. ``--from Retention``), and writes the command
and that output between the markers. Everything outside the markers is left as it is.

    python benchmarks/refresh_results.py docs/results.md
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- report: (?P<args>.+?) -->\n)(?P<body>.*?)(<!-- /report -->)", re.S)


def run(args: str) -> str:
    words = shlex.split(args)
    start = "Protocol v2"
    if "--from" in words:
        i = words.index("--from")
        start, words = words[i + 1], words[:i] + words[i + 2:]
    if "--report" not in words:
        raise SystemExit(f"refusing to run a command that may train (no --report): {args}")
    out = subprocess.run([sys.executable, "-m", "sgg_optim.fewshot.cli", *words], capture_output=True, text=True,
                         check=True, env={"HF_HUB_OFFLINE": "1", **__import__("os").environ}).stdout
    lines = [line for line in out.splitlines() if not line.startswith("done in ")]  # timing of the report itself
    first = next((i for i, line in enumerate(lines) if line.startswith(start)), None)
    if first is None:
        raise SystemExit(f"no line starting with {start!r} in the output of: sgg-optim {args}")
    shown = " \\\n    ".join(_wrap(["sgg-optim", *words]))
    return f"```bash\n{shown}\n```\n\n" + "\n".join(lines[first:]).strip() + "\n"


def _wrap(words: list[str], width: int = 90) -> list[str]:
    """The command in lines of about ``width`` characters, an option and its value kept together."""
    parts, i = [], 0
    while i < len(words):
        take = 2 if words[i].startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--") else 1
        parts.append(" ".join(shlex.quote(w) for w in words[i:i + take]))
        i += take
    lines, cur = [], ""
    for p in parts:
        if cur and len(cur) + 1 + len(p) > width:
            lines.append(cur)
            cur = p
        else:
            cur = f"{cur} {p}".strip()
    return lines + [cur]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", type=Path)
    args = ap.parse_args()
    text = args.page.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + run(m.group("args")) + m.group(4), text)
    args.page.write_text(new)
    print(f"{len(BLOCK.findall(text))} blocks refreshed in {args.page}")


if __name__ == "__main__":
    main()
