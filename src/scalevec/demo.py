"""``scalevec demo``: baseline vs unified on the tiny preset, same data and tokens, side by side.

One seed of early training: its difference is an illustration, not a verdict, so the output says so and
prints the committed verdict of the unified study (``docs/results/[earlier/]unified/results.json``) beside it, and the
loss in nats per byte beside nats per token (a BPE token spans several bytes; studies run byte-level).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from scalevec.config import load_config
from scalevec.train import train
from scalevec.typed_config import ConfigError, differences

DEMO_DEFAULTS = ["model.preset=tiny", "train.steps=400", "train.batch_size=16", "train.seq_len=128",
                 "train.eval_every=100", "train.ckpt_every=200", "optim.lr=3e-3"]
STRATEGIES = ("baseline", "unified")


def compile_default() -> list[str]:
    """Compile both 400-step runs where inductor can build CPU kernels, though ``train.compile=auto`` would leave runs this
    short eager: cold, the two compiles cost about what compiled steps save over both runs; warm, the demo is
    ~1.4x faster, and its throughput column shows the path long runs take (docs/performance.md)."""
    from scalevec.train.compiling import cpu_compiler_available

    return ["train.compile=true"] if cpu_compiler_available() else []


def steady_tok_per_s(run_dir: Path) -> float | None:
    """Median tokens/s of the logged windows after the first (which holds compilation and allocation)."""
    tps = [r["tok_per_s"] for r in read_metrics(run_dir) if "tok_per_s" in r][1:]
    return statistics.median(tps) if tps else None


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.exists() else []


def _run(out: Path, strategy: str, overrides: list[str]) -> dict:
    run_dir = out / strategy
    cfg = load_config(None, [*DEMO_DEFAULTS, *compile_default(), *overrides, f"scale.strategy={strategy}",
                             f"run.out={run_dir}"])
    summary = run_dir / "summary.json"
    if summary.exists():
        done = load_config(run_dir / "config.toml")
        cfg.model.vocab_size = done.model.vocab_size
        changed = differences(done, cfg)
        if not changed:
            print(f"{strategy}: finished earlier in {run_dir}, reusing it")
            return json.loads(summary.read_text())
        raise ConfigError(f"{run_dir} holds a finished run with another config ({'; '.join(changed)}); "
                          "use --out to pick a new folder or remove it")
    resume = (run_dir / "config.toml").exists()
    print(f"{strategy}: {'resuming' if resume else 'training'} in {run_dir}", flush=True)
    return train(cfg, resume=resume)


def plot(out: Path, runs: dict[str, Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, run_dir in runs.items():
        rows = read_metrics(run_dir)
        tr = [r for r in rows if "train_loss" in r]
        ev = [r for r in rows if "val_loss" in r]
        line, = ax.plot([r["tokens"] / 1e6 for r in tr], [r["train_loss"] for r in tr], alpha=0.35, lw=1)
        ax.plot([r["tokens"] / 1e6 for r in ev], [r["val_loss"] for r in ev], "o-", color=line.get_color(),
                label=f"{name} (validation)")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("tiny preset: baseline vs unified (faint: train loss)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / "loss.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


def bytes_per_token(run_dir: Path) -> float | None:
    """UTF-8 bytes per token of the validation slice the run evaluates on (its end-of-text ids left out)."""
    from scalevec.data import load_tokenizer, read_shard, resolve_data

    cfg = load_config(run_dir / "config.toml")
    spec = resolve_data(cfg.data)
    if spec.tokenizer_dir is None:
        return None
    ids = [int(i) for i in read_shard(spec.val_files[0])[: cfg.data.val_tokens] if int(i) != spec.eot_id]
    text = load_tokenizer(spec.tokenizer_dir).decode(ids)
    return len(text.encode("utf-8")) / max(1, len(ids))


def committed_verdict(results: Path = RESULTS) -> str:
    """The unified study's committed verdict: its pooled (else first) claim at each arm's own optimum."""
    path = next((p for p in (results / "unified" / "results.json", results / "earlier" / "unified" / "results.json")
                 if p.is_file()), None)
    if path is None:
        return "no committed verdict (no unified study under docs/results/ in this checkout)"
    res = json.loads(path.read_text())
    claims = res.get("claims", [])
    if not claims:
        return f"no verdict in {path}"
    pick = next((c for c in claims if c["group"].startswith("pooled") and "own optimum" in c["group"]),
                next((c for c in claims if c["group"] == "pooled"), claims[0]))
    verdict = pick["verdict"].split(" (")[0].upper()
    delta = pick.get("delta", pick.get("mean"))
    ci = pick.get("ci95")
    where = f"{res.get('budget', '?')} budget, {pick['group']}"
    text = f"{verdict}: unified − baseline = {delta:+.4f}" if delta is not None else verdict
    text += f", 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci and None not in ci else ""
    old = "" if "regime" in res else "; from the earlier study design (untuned LRs, no null arm)"
    return f"{text} ({where}{old}; {path})"


def run_demo(out: Path, overrides: list[str], steps: int | None = None) -> int:
    if steps is not None:
        overrides = [*overrides, f"train.steps={steps}"]
    summaries = {s: _run(out, s, overrides) for s in STRATEGIES}
    png = plot(out, {s: out / s for s in STRATEGIES})
    base = summaries["baseline"]["final_val_loss"]
    bpt = bytes_per_token(out / "baseline")
    header = (f"{'strategy':<10} {'nats/tok':>9} {'nats/byte':>10} {'Δ nats/tok':>11} {'tok/s':>8} {'wall s':>7} "
              f"{'params':>10} {'scale-vec':>10} {'tokens':>10}")
    lines = [header]
    for s, r in summaries.items():
        tps = steady_tok_per_s(out / s) or r["tok_per_s"]
        per_byte = f"{r['final_val_loss'] / bpt:>10.4f}" if bpt else f"{'—':>10}"
        lines.append(f"{s:<10} {r['final_val_loss']:>9.4f} {per_byte} {r['final_val_loss'] - base:>+11.4f} "
                     f"{tps:>8,.0f} {r['wall_s']:>7.0f} {r['params']:>10,} {r['scale_vector_params']:>10,} "
                     f"{r['tokens']:>10,}")
    table = "\n".join(lines)
    n = summaries["baseline"].get("non_embedding_params") or 1
    print("\n" + table + "\n\n"
          f"What this number is: ONE seed, early training ({summaries['baseline']['tokens'] / n:.1f} tokens per "
          "non-embedding parameter), one learning rate for both: an illustration, NOT A VERDICT. Early leads "
          "often shrink or flip with more tokens, other seeds or each arm's own best LR.\n"
          f"Committed verdict of the unified study: {committed_verdict()}\n"
          "(`scalevec study unified` measures it: tuned LRs, a null arm, several seeds; docs/studies.md)\n\n"
          "nats/byte: nats/token divided by the validation slice's UTF-8 bytes per token"
          + (f" ({bpt:.2f})" if bpt else "") + "; tok/s: median training throughput of the logging windows "
          "after the first (compilation and evaluation left out; `benchmarks/overhead.py` measures a "
          f"strategy's cost); wall s: the whole run\nloss curves: {png}")
    (out / "demo.txt").write_text(table + "\n")
    return 0
