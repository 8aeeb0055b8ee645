"""Pool the rounds of several ``overhead.py --json`` runs: the median per-round time ratio over all of them and
a bootstrap 95% interval for it (one run's ratio moves more than its A/A row suggests on a shared host).

    for i in $(seq 10); do python benchmarks/overhead.py --control --rounds 31 --json runs/overhead/tiny_$i.json; done
    python benchmarks/pool_rounds.py runs/overhead/tiny_*.json      # or a file holding a list of their rows
    python benchmarks/pool_rounds.py benchmarks/results/overhead_tiny_compile_ab.json --where tree=after
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="overhead.py --json outputs (lists of rows with round_ms)")
    p.add_argument("--shape", default="tiny")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--where", nargs="+", default=[], metavar="KEY=VALUE",
                   help="only rows whose KEY is VALUE (stored A/B files tag their rows, e.g. tree=after or set=2)")
    args = p.parse_args()
    if bad := [w for w in args.where if "=" not in w]:
        p.error(f"--where: {bad[0]!r} is not KEY=VALUE")
    where = [w.split("=", 1) for w in args.where]
    rows = []
    for f in args.files:
        data = json.loads(Path(f).read_text())
        if not isinstance(data, list) or not all(isinstance(r, dict) and "round_ms" in r for r in data):
            raise SystemExit(f"pool_rounds.py: {f} is not an overhead.py --json output (rows with round_ms)")
        rows += [r for r in data if r.get("shape") == args.shape and all(str(r.get(k)) == v for k, v in where)]
    if not rows:
        which = args.shape + "".join(f", {w}" for w in args.where)
        raise SystemExit(f"pool_rounds.py: no {which} rows in {' '.join(args.files)}")
    for line in pooled_lines(rows, args.shape, args.resamples):
        print(line)


def pooled_lines(rows: list[dict], shape: str, resamples: int = 2000) -> list[str]:
    """One line per candidate (and the A/A row): the median of every run's per-round ratios and its bootstrap
    95% interval. Rows of several candidates (e.g. a preset and an ablation of it) give one line each."""
    pooled: dict[str, list[float]] = {}
    for r in rows:
        t = r["round_ms"]
        for k in t:
            if k != "baseline":
                pooled.setdefault(k, []).extend(a / b for a, b in zip(t[k], t["baseline"]))
    rng = random.Random(0)
    lines = []
    for k, v in pooled.items():
        boot = sorted(statistics.median(rng.choices(v, k=len(v))) for _ in range(resamples))
        lo, hi = boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot))]
        name = "A/A" if k == "control" else f"{k}/baseline"
        runs = sum(k in r["round_ms"] for r in rows)
        lines.append(f"{shape}: {name:<18} pooled median {statistics.median(v):.3f}  95% interval {lo:.3f}-{hi:.3f}  "
                     f"({runs} runs, {len(v)} rounds)")
    return lines


if __name__ == "__main__":
    main()
