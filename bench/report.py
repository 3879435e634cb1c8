"""Turn one or more result JSON files of ``python -m interest_kernels.bench`` into markdown.

    python bench/report.py bench/results/h200-2026-11-25.json > table.md
"""
from __future__ import annotations

import json
import sys

from interest_kernels.bench.harness import Machine, Row, markdown_table


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = Machine(**data["machine"])
        rows = [Row(**r) for r in data["rows"]]
        print(f"## {path}\n")
        print(markdown_table(machine, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
