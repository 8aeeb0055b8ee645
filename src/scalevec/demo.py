"""``scalevec demo``: baseline vs unified on the tiny preset, same data and tokens, side by side."""

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
    from scalevec.train.trainer import cpu_compiler_available

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


def run_demo(out: Path, overrides: list[str], steps: int | None = None) -> int:
    if steps is not None:
        overrides = [*overrides, f"train.steps={steps}"]
    summaries = {s: _run(out, s, overrides) for s in STRATEGIES}
    png = plot(out, {s: out / s for s in STRATEGIES})
    base = summaries["baseline"]["final_val_loss"]
    header = (f"{'strategy':<10} {'val loss':>9} {'Δ vs base':>10} {'tok/s':>8} {'wall s':>7} {'params':>10} "
              f"{'scale-vec':>10} {'tokens':>10}")
    lines = [header]
    for s, r in summaries.items():
        tps = steady_tok_per_s(out / s) or r["tok_per_s"]
        lines.append(f"{s:<10} {r['final_val_loss']:>9.4f} {r['final_val_loss'] - base:>+10.4f} {tps:>8,.0f} "
                     f"{r['wall_s']:>7.0f} {r['params']:>10,} {r['scale_vector_params']:>10,} {r['tokens']:>10,}")
    table = "\n".join(lines)
    print("\n" + table + f"\n\ntok/s: median training throughput of the logging windows after the first (compilation and "
          "evaluation pauses left out; one run each: `benchmarks/overhead.py` measures a strategy's cost); "
          f"wall s: the whole run\nloss curves: {png}\n"
          "(one seed: see `scalevec study` for seeds, spread and significance)")
    (out / "demo.txt").write_text(table + "\n")
    return 0
