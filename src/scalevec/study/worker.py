"""One study run in its own process: ``python -m scalevec.study.worker [--resume] key=value ...``.

The same as ``scalevec train`` (which records per-site γ statistics at each evaluation) plus
``resources.json``: peak resident memory of the process and the thread count, for the overhead table.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    from scalevec.config import load_config
    from scalevec.train import trainer

    resume = "--resume" in argv
    overrides = [a for a in argv if a != "--resume"]
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    summary = trainer.train(cfg, resume=resume)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    res = {
        "peak_rss_mib": peak_kb / 1024,
        "threads": torch.get_num_threads(),
        "process_s": time.perf_counter() - t0,
    }
    if torch.cuda.is_available() and summary.get("device", "").startswith("cuda"):
        res["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (Path(cfg.run.out) / "resources.json").write_text(json.dumps(res, indent=1))
    return 0


def _errors() -> tuple[type[BaseException], ...]:
    from scalevec.train.checkpoint import CheckpointError
    from scalevec.train.trainer import TrainingError
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
        from scalevec.train.trainer import TrainingStopped

        if isinstance(e, TrainingStopped):  # SIGTERM: checkpoint saved; the next study invocation resumes it
            print(f"stopped: {e}", file=sys.stderr)
            sys.exit(143)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
