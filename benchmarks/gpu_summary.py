"""``gpu.py summary DIR``: the headline numbers of a GPU check's JSON files as a Markdown table, for
docs/performance.md; run afterwards on any machine (it adds phase e's interval where scipy is installed)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def speed_row(r: dict) -> str:
    mfu, sheet = r.get("mfu_measured_peak") or {}, r.get("mfu_datasheet_peak") or {}
    tok = r.get("tok_per_s") or {}
    first = r.get("first_call_s") or {}

    def fmt(key: str, spec: str) -> str:
        return format(r[key], spec) if r.get(key) is not None else "n/a"

    return (f"| {r['phase']} | {r['preset']} | {r['shape']['batch']}x{r['shape']['seq']} | "
            f"{'compiled' if r['compiled'] else 'eager'} | {tok.get('baseline', 0):,.0f} | "
            f"{tok.get('unified', 0):,.0f} | {fmt('time_ratio', '.3f')} | {fmt('aa_ratio', '.3f')} | "
            f"{fmt('memory_ratio', '.3f')} | {_pct(mfu.get('baseline'))} / {_pct(sheet.get('baseline'))} | "
            f"{first.get('baseline', 0):.0f} / {first.get('unified', 0):.0f} |"
            + ("" if r.get("complete") else " (incomplete)"))


def train_line(r: dict) -> str:
    from gpu_train import paired

    final = {s: {int(k): v["final_val_loss"] for k, v in runs.items()} for s, runs in r["runs"].items()}
    p = r["paired_final_val_loss_unified_minus_baseline"]
    if p.get("ci95") is None and "unified" in final and "baseline" in final:
        p = paired(final["unified"], final["baseline"])
    ci = f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" if p.get("ci95") else "(no interval)"
    mean = "n/a" if p.get("mean") is None else f"{p['mean']:+.4f}"
    return (f"e: {r['preset']}, {r['steps']} steps ({r['epochs']:.2f} epoch), {p['n']} seeds: unified - baseline "
            f"final val loss {mean} {ci}; {r['label']}")


def summary(folder: Path | None) -> int:
    folder = folder or Path(os.environ.get("OUT") or "runs/gpu")
    found = {p.stem.removeprefix("gpu_"): json.loads(p.read_text()) for p in sorted(folder.glob("gpu_*.json"))}
    if not found:
        print(f"no gpu_*.json in {folder}")
        return 2
    pre = found.get("preflight", {})
    print(f"{pre.get('device', '?')}, torch {pre.get('torch', '?')}, CUDA {pre.get('cuda', '?')}, "
          f"started {pre.get('started', '?')}\n")
    if "a" in found:
        checks = found["a"]["checks"]
        bad = [c["name"] for c in checks if not c["ok"]]
        print(f"a: {len(checks) - len(bad)}/{len(checks)} correctness checks pass"
              + (f"; failed: {'; '.join(bad)}" if bad else "") + "\n")
    rows = [found[p] for p in "bcd" if p in found and "tok_per_s" in found[p]]
    if rows:
        print("| phase | preset | batch | mode | baseline tok/s | unified tok/s | time ratio | A/A | memory ratio "
              "| MFU baseline (measured / datasheet peak) | first call s (baseline / unified) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(speed_row(r))
        print()
    if "e" in found and found["e"].get("runs"):
        print(train_line(found["e"]))
    return 0
