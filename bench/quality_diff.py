"""Two bench.quality JSON files side by side: per row and figure, both means, the mean of the
per-seed differences (B - A, same seeds), and the standard error of A's mean over seeds
(the seed-to-seed noise a difference is judged against).

    python -m bench.quality_diff fp32.json bf16.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

FIGURES = ("colour_drift", "shape_iou", "bg_error", "odd_even", "flicker", "colour_match")


def sem(values: list[float]) -> float:
    """Standard error of the mean (0 for a single value)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality_diff", description=__doc__)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    a, b = (json.loads(p.read_text(encoding="utf-8")) for p in (args.a, args.b))
    for key in ("fidelity",):
        if key in a and key in b:
            print(f"fidelity: A {a[key]['fidelity']:.3f}, B {b[key]['fidelity']:.3f}")
    print(f"{'row':<36} {'figure':<13} {'A':>8} {'B':>8} {'B-A':>8} {'SEM A':>8}")
    for section, rows in a.get("per_seed", {}).items():
        for row, seeds_a in rows.items():
            seeds_b = b.get("per_seed", {}).get(section, {}).get(row)
            if not seeds_b or len(seeds_b) != len(seeds_a):
                continue
            for fig in FIGURES:
                va = [s[fig] for s in seeds_a if s.get(fig) is not None]
                vb = [s[fig] for s in seeds_b if s.get(fig) is not None]
                if len(va) != len(vb) or not va:
                    continue
                diff = statistics.mean(y - x for x, y in zip(va, vb, strict=True))
                print(
                    f"{row:<36} {fig:<13} {statistics.mean(va):8.3f} {statistics.mean(vb):8.3f} "
                    f"{diff:8.3f} {sem(va):8.3f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
