"""Pool several ``scripts/evaluate.py`` results (e.g. the held-out sets) into one table: every slice
session counts once, whichever set it came from; then one row per set and method, the mean Dice after
each click (does every click help?), and optionally a Dice-against-clicks plot.

    .venv/bin/python benchmarks/pool_results.py benchmarks/results/*/results.json [--plot pooled.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def row(method: str, rows: list[dict]) -> str:
    clicks = np.array([r["click_dice"] for r in rows])
    box = np.mean([r["box_dice"] for r in rows])
    noc = {k: (np.mean([r["noc"][k] for r in rows]), 100 * np.mean([not r["noc_reached"][k] for r in rows]))
           for k in ("noc85", "noc90")}
    at = [f"{clicks[:, n - 1].mean():.3f}" if clicks.shape[1] >= n else "–" for n in (1, 3, 5, 10)]
    return (f"| {method} | {len(rows)} | {box:.3f} | " + " | ".join(at) + f" | {noc['noc85'][0]:.1f} "
            f"({noc['noc85'][1]:.0f}%) | {noc['noc90'][0]:.1f} ({noc['noc90'][1]:.0f}%) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path, help="write the pooled Dice-against-clicks plot here")
    args = parser.parse_args()
    sessions: dict[str, list[dict]] = {}
    per_set: list[tuple[str, str, list[dict]]] = []
    for path in args.results:
        report = json.loads(path.read_text())
        for method, data in report["methods"].items():
            sessions.setdefault(method, []).extend(data["records"]["slices"])
            per_set.append((path.parent.name, method, data["records"]["slices"]))
    header = ("| method | slices | box | 1 click | 3 clicks | 5 clicks | 10 clicks | NoC@85 (fail) | NoC@90 (fail) |\n"
              "|---|---|---|---|---|---|---|---|---|")
    print(f"pooled: {', '.join(p.parent.name for p in args.results)}\n")
    print(header)
    for method, rows in sessions.items():
        print(row(method, rows))
    print("\nper set:\n")
    print(header.replace("| method |", "| set / method |", 1))
    for name, method, rows in per_set:
        print(row(f"{name} / {method}", rows))
    print("\nmean Dice after each click (pooled):\n")
    for method, rows in sessions.items():
        curve = np.array([r["click_dice"] for r in rows]).mean(axis=0)
        drops = [n + 2 for n in range(len(curve) - 1) if curve[n + 1] < curve[n] - 1e-4]
        print(f"- {method}: " + " ".join(f"{v:.3f}" for v in curve)
              + (f" (falls at click {', '.join(map(str, drops))})" if drops else " (never falls)"))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for method, rows in sessions.items():
            curve = np.array([r["click_dice"] for r in rows]).mean(axis=0)
            ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=method)
            ax.axhline(np.mean([r["box_dice"] for r in rows]), ls=":", lw=1, color=ax.lines[-1].get_color())
        ax.set(xlabel="clicks", ylabel="mean Dice", ylim=(0, 1),
               title=f"held out, pooled ({len(next(iter(sessions.values())))} sessions; dotted: tight box)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
