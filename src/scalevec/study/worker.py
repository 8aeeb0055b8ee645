"""One study run in its own process: ``python -m scalevec.study.worker [--resume] [--score N [--score-tokens M]]
key=value ...``.

The same as ``scalevec train`` (which records per-site γ statistics at each evaluation) plus
``resources.json`` (peak resident memory, thread count) and, with ``--score N``, ``score.json``: the newest
``N`` checkpoints each evaluated on the *whole* validation split, and their mean, the study's score. The
periodic evaluations of a run use a fixed slice of the split (cheap, for curves); the score does not.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

SCORE_FILE = "score.json"


def score_run(run_dir: Path, n: int, tokens: int = 0) -> dict:
    """Mean validation loss of the newest ``n`` checkpoints over the full validation split (its first
    ``tokens`` when > 0)."""
    from scalevec.config import from_table
    from scalevec.data import TokenStream, eval_batches, resolve_data
    from scalevec.evaluate import evaluate
    from scalevec.models import build_model
    from scalevec.train.batches import resolve_vocab
    from scalevec.train.checkpoint import list_checkpoints, load_checkpoint
    from scalevec.typed_config import load_toml

    cfg = from_table(load_toml(run_dir / "config.toml"))
    spec = resolve_data(cfg.data)
    resolve_vocab(cfg, spec.vocab_size)
    t = cfg.train
    batches = eval_batches(spec.val_files, t.batch_size, t.seq_len, tokens or 1 << 62, vocab_size=spec.vocab_size)
    eval_tokens = sum(int(y.numel()) for _, y in batches)
    train_tokens = TokenStream(spec.train_files, t.seq_len, spec.vocab_size).n_windows * t.seq_len
    model = build_model(cfg.model, cfg.scale)
    evals = []
    for ckpt in list_checkpoints(run_dir)[-n:]:
        state, meta = load_checkpoint(ckpt)
        model.load_state_dict(state, strict=False)
        evals.append({"step": int(meta["step"]), "val_loss": evaluate(model, batches, cfg, torch.device("cpu"))})
    losses = [e["val_loss"] for e in evals]
    return {"score": sum(losses) / len(losses) if losses else float("nan"), "evals": evals,
            "eval_tokens": eval_tokens, "train_split_tokens": train_tokens}


def main(argv: list[str]) -> int:
    from scalevec.config import load_config
    from scalevec.train import train

    resume = "--resume" in argv
    opts = {"--score": 0, "--score-tokens": 0}
    for flag in opts:
        if flag in argv:
            i = argv.index(flag)
            opts[flag] = int(argv[i + 1])
            argv = argv[:i] + argv[i + 2:]
    score = opts["--score"]
    overrides = [a for a in argv if a != "--resume"]
    cfg = load_config(None, overrides)
    run_dir = Path(cfg.run.out)
    if not (run_dir / "summary.json").is_file():
        t0 = time.perf_counter()
        summary = train(cfg, resume=resume)
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        res = {"peak_rss_mib": peak_kb / 1024, "threads": torch.get_num_threads(),
               "process_s": time.perf_counter() - t0}
        if torch.cuda.is_available() and summary.get("device", "").startswith("cuda"):
            res["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        (run_dir / "resources.json").write_text(json.dumps(res, indent=1))
    if score:
        t0 = time.perf_counter()
        result = score_run(run_dir, score, opts["--score-tokens"])
        result["score_s"] = time.perf_counter() - t0
        (run_dir / SCORE_FILE).write_text(json.dumps(result, indent=1))
    return 0


def _errors() -> tuple[type[BaseException], ...]:
    from scalevec.train.checkpoint import CheckpointError
    from scalevec.train.errors import TrainingError
    from scalevec.typed_config import ConfigError

    errors: tuple[type[BaseException], ...] = (ConfigError, TrainingError, CheckpointError)
    try:
        from scalevec.data import DataError

        errors += (DataError,)
    except ImportError:
        pass
    return errors


if __name__ == "__main__":
    from scalevec.typed_config import ConfigError

    try:
        sys.exit(main(sys.argv[1:]))
    except _errors() as e:
        from scalevec.train.errors import TrainingStopped

        if isinstance(e, TrainingStopped):  # SIGTERM or Ctrl-C: checkpoint saved; the next invocation resumes it
            print(f"stopped: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
