"""Pool several ``scripts/evaluate.py`` results (e.g. the held-out sets) into one table: every slice
session counts once, whichever set it came from.

    .venv/bin/python benchmarks/pool_results.py benchmarks/results/*_heldout/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args()
    sessions: dict[str, list[dict]] = {}
    for path in args.results:
        report = json.loads(path.read_text())
        for method, data in report["methods"].items():
            sessions.setdefault(method, []).extend(data["records"]["slices"])
    print(f"pooled: {', '.join(p.parent.name for p in args.results)}\n")
    print("| method | slices | box | 1 click | 3 clicks | 5 clicks | NoC@85 (fail) | NoC@90 (fail) |")
    print("|---|---|---|---|---|---|---|---|")
    for method, rows in sessions.items():
        clicks = np.array([r["click_dice"] for r in rows])
        box = np.mean([r["box_dice"] for r in rows])
        noc = {k: (np.mean([r["noc"][k] for r in rows]), 100 * np.mean([not r["noc_reached"][k] for r in rows]))
               for k in ("noc85", "noc90")}
        print(f"| {method} | {len(rows)} | {box:.3f} | {clicks[:, 0].mean():.3f} | {clicks[:, 2].mean():.3f} | "
              f"{clicks[:, 4].mean():.3f} | {noc['noc85'][0]:.1f} ({noc['noc85'][1]:.0f}%) | "
              f"{noc['noc90'][0]:.1f} ({noc['noc90'][1]:.0f}%) |")


if __name__ == "__main__":
    main()
