"""Export BIG-bench ``presuppositions_as_nli`` (not a built-in task) to a JSONL for ``sgg-optim compare``.

The task ships in the ``bigbench==1.0.0`` sdist (``bigbench/benchmark_tasks/presuppositions_as_nli/task.json``,
735 examples). Each example's ``input`` is ``"Sentence 1: <premise> \\nSentence 2: <hypothesis>\\n\\nThe answer
is: "``; the label is the argmax of ``target_scores`` (entailment, neutral, contradiction). Written one JSON
object per line with the columns ``text`` (premise), ``hypothesis`` and ``label``::

    python benchmarks/export_presuppositions_nli.py --out benchmarks/data/presuppositions_nli.jsonl
    sgg-optim compare --data benchmarks/data/presuppositions_nli.jsonl --text-column text \\
        --text-pair-column hypothesis --label-column label --model minilm --shots 8 --seeds 2 \\
        --lrs 5e-5,2e-4 --strategies adamw,cone-kshot --threads 1 --out benchmarks/results/presuppositions_nli

``--sdist`` reads an already downloaded ``bigbench-1.0.0.tar.gz``; without it the sdist (358 MB) is
downloaded with pip into a temporary folder and streamed once.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import tempfile
from pathlib import Path

MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/presuppositions_as_nli/task.json"
PATTERN = re.compile(r"^Sentence 1:\s*(?P<premise>.*?)\s*\nSentence 2:\s*(?P<hyp>.*?)\s*\n\s*\nThe answer is:\s*$",
                     re.S)


def read_task(sdist: Path) -> dict:
    with tarfile.open(sdist, "r|gz") as tar:  # one sequential pass; the archive is never loaded whole
        for member in tar:
            if member.name == MEMBER:
                return json.load(tar.extractfile(member))
    raise SystemExit(f"{sdist}: no {MEMBER}")


def rows(task: dict) -> list[dict]:
    out = []
    for i, ex in enumerate(task["examples"]):
        m = PATTERN.match(ex["input"])
        if m is None:
            raise SystemExit(f"example {i}: unexpected input format {ex['input'][:80]!r}")
        scores = ex["target_scores"]
        best = max(scores.values())
        winners = [k for k, v in scores.items() if v == best]
        if len(winners) != 1:
            raise SystemExit(f"example {i}: no single best label in {scores}")
        out.append({"text": m["premise"], "hypothesis": m["hyp"], "label": winners[0]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sdist", default="", help="a downloaded bigbench-1.0.0.tar.gz (default: download it)")
    p.add_argument("--out", default="benchmarks/data/presuppositions_nli.jsonl", help="the JSONL to write")
    args = p.parse_args()
    if args.sdist:
        task = read_task(Path(args.sdist))
    else:
        from sgg_optim.fewshot import assets

        with tempfile.TemporaryDirectory() as tmp:
            task = read_task(assets.download(assets.BIGBENCH, Path(tmp), quiet=False))
    data = rows(task)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
    counts = {}
    for r in data:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    print(f"{out}: {len(data)} examples, {counts}")


if __name__ == "__main__":
    main()
