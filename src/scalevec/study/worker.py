"""One study run in its own process: ``python -m scalevec.study.worker [--resume] key=value ...``.

The same as ``scalevec train`` plus two records a study needs and a plain run does not:

- per-site statistics of every scale vector (mean, std, min, max of γ; the magnitude for OR/ER) at each
  evaluation, written into the run's ``metrics.jsonl`` rows as ``gamma/<module>/<stat>``. They come from a
  parameter-free probe module attached to the model, picked up by the trainer's ``eval_metrics`` hook, so the
  trainer and the checkpoints are untouched (the probe has no state);
- ``resources.json``: peak resident memory of the process and the thread count, for the overhead table.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

from scalevec.scale import ScaleVector


class ScaleStats(nn.Module):
    """Reports γ statistics of the model it watches; holds no parameters or buffers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._watch = [model]  # a list, so the model is not registered as a child (no cycle)

    @torch.no_grad()
    def eval_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, m in self._watch[0].named_modules():
            if not isinstance(m, ScaleVector):
                continue
            g = m().detach().float()
            out[f"gamma/{name}/mean"] = g.mean().item()
            out[f"gamma/{name}/std"] = g.std().item() if g.numel() > 1 else 0.0
            out[f"gamma/{name}/min"] = g.min().item()
            out[f"gamma/{name}/max"] = g.max().item()
            if m.param in ("or", "er"):
                mag = m.magnitude.detach().float()
                out[f"gamma/{name}/magnitude"] = (mag.exp() if m.param == "er" else mag).mean().item()
        return out


def _with_probe(build):
    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        model.add_module("scale_stats", ScaleStats(model))
        return model

    return build_model


def main(argv: list[str]) -> int:
    from scalevec.config import load_config
    from scalevec.train import trainer

    resume = "--resume" in argv
    overrides = [a for a in argv if a != "--resume"]
    cfg = load_config(None, overrides)
    trainer.build_model = _with_probe(trainer.build_model)
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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
