"""Phase e of the GPU check: a short training comparison, baseline against unified, through the trainer.

Several seeds (a seed fixes the init and the data order, shared by both arms), within one epoch of the carried
corpus, an evaluation curve per run, and the per-seed paired difference of the final validation loss with its
95% interval. Runs this short on a corpus this small are a smoke check of the training dynamics on the device,
not a verdict on the strategies (docs/studies.md has the studies).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from gpu_common import DATA, DEVICE, STRATEGIES, Result, data_overrides, finite, pick, release

from scalevec.config import load_config
from scalevec.train import train

PRESET, BATCH, SEQ, SEEDS = pick(("0.12b", 8, 512, 3), ("tiny", 2, 32, 2))
EPOCH_SHARE = pick(0.9, None)  # the share of the corpus's training tokens the runs see; smoke: a few steps
SMOKE_STEPS = 4
EVALS = pick(8, 2)  # evaluations per run


def paired(arm: dict[int, float], ref: dict[int, float]) -> dict:
    """Mean of the per-seed differences ``arm - ref`` and its 95% interval (paired t), by the studies'
    statistics when scipy is present; without it, ``gpu.py summary`` adds the interval where scipy is."""
    seeds = sorted(k for k in arm.keys() & ref.keys() if arm[k] is not None and ref[k] is not None)
    deltas = [arm[k] - ref[k] for k in seeds]
    out = {"n": len(deltas), "deltas": deltas, "mean": sum(deltas) / len(deltas) if deltas else None, "ci95": None}
    try:
        from scalevec.study.stats import paired as paired_t
    except ImportError:
        out["note"] = "no scipy here: python benchmarks/gpu.py summary DIR adds the interval"
        return out
    p = paired_t({k: arm[k] for k in seeds}, {k: ref[k] for k in seeds})
    out.update(sd=finite(p.sd), p=finite(p.p))
    if math.isfinite(p.lo) and math.isfinite(p.hi):
        out["ci95"] = [p.lo, p.hi]
    return out


def main() -> int:
    train_tokens = json.loads((DATA / "meta.json").read_text())["train_tokens"]
    tokens_per_step = BATCH * SEQ
    steps = int(EPOCH_SHARE * train_tokens // tokens_per_step) if EPOCH_SHARE else SMOKE_STEPS
    every = max(1, steps // EVALS)
    res = Result("e", preset=PRESET, batch=BATCH, seq=SEQ, steps=steps, eval_every=every, seeds=SEEDS,
                 train_tokens_in_corpus=train_tokens, tokens_per_run=steps * tokens_per_step,
                 epochs=steps * tokens_per_step / train_tokens, runs={s: {} for s in STRATEGIES},
                 label="smoke check of training dynamics on the device, not a verdict")
    print(f"phase e: {PRESET} x {SEEDS} seeds x {STRATEGIES}, {steps} steps of {tokens_per_step} tokens "
          f"({res['epochs']:.2f} epoch) on {res['device']}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-train-"))
    try:
        for seed in range(SEEDS):
            for s in STRATEGIES:
                out = work / f"{s}-{seed}"
                cfg = load_config(None, [
                    f"model.preset={PRESET}", f"scale.strategy={s}", f"train.steps={steps}",
                    f"train.batch_size={BATCH}", f"train.seq_len={SEQ}", f"train.seed={seed}", f"data.seed={seed}",
                    f"train.eval_every={every}", f"train.log_every={every}", "train.ckpt_every=0",
                    "train.compile=false", "train.progress=false", "train.scale_stats=false",
                    f"train.device={DEVICE}", f"run.out={out}", *pick([], ["model.n_layers=2"]),
                    *data_overrides()])
                summary = train(cfg)
                rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
                res["runs"][s][seed] = {
                    "final_val_loss": finite(summary["final_val_loss"]), "tok_per_s": summary["tok_per_s"],
                    "wall_s": summary["wall_s"],
                    "val_curve": [[r["step"], finite(r["val_loss"])] for r in rows if "val_loss" in r]}
                res.save()
                print(f"  seed {seed} {s}: final val loss {summary['final_val_loss']:.4f}, "
                      f"{summary['tok_per_s']:,.0f} tok/s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                release()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    final = {s: {k: r["final_val_loss"] for k, r in res["runs"][s].items()} for s in STRATEGIES}
    res["paired_final_val_loss_unified_minus_baseline"] = paired(final["unified"], final["baseline"])
    res["mean_val_curve"] = {s: mean_curve(list(res["runs"][s].values())) for s in STRATEGIES}
    res.done()
    p = res["paired_final_val_loss_unified_minus_baseline"]
    ci = f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" if p.get("ci95") else "(interval: see gpu.py summary)"
    print(f"phase e: unified - baseline final val loss {p['mean']:+.4f} {ci} over {p['n']} seeds "
          f"(smoke check, not a verdict)", flush=True)
    return 0


def mean_curve(runs: list[dict]) -> list[list]:
    """[step, mean validation loss over the seeds] at every evaluation."""
    out = []
    for i, (step, _) in enumerate(runs[0]["val_curve"]):
        vals = [r["val_curve"][i][1] for r in runs if r["val_curve"][i][1] is not None]
        out.append([step, sum(vals) / len(vals) if vals else None])
    return out
