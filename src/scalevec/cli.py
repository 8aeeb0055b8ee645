"""The ``scalevec`` command line. Every subcommand reports bad input as one line and exits non-zero."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

CONFIG_HELP = "key=value overrides, e.g. model.preset=tiny scale.strategy=unified optim.name=muon train.steps=300"


def _load(args) -> Config:  # noqa: F821
    from scalevec.config import load_config

    return load_config(args.config, args.overrides)


def cmd_prepare(args) -> int:
    from scalevec.data import resolve_data

    cfg = _load(args)
    spec = resolve_data(cfg.data)
    print(json.dumps({"train_files": [str(p) for p in spec.train_files], "val_files": [str(p) for p in spec.val_files],
                      "vocab_size": spec.vocab_size}, indent=1))
    return 0


def cmd_train(args) -> int:
    from scalevec.config import load_config
    from scalevec.train import train

    if args.from_step is not None and not args.resume:
        raise _usage("--from-step: continues a run, so it needs --resume RUN_DIR")
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise _usage(f"--resume: {run_dir} holds no run (no config.toml)")
        cfg = load_config(args.config or run_dir / "config.toml", [*args.overrides, f"run.out={run_dir}"])
    else:
        cfg = _load(args)
    args.run_dir = Path(cfg.run.out)  # named if a second Ctrl-C aborts the run
    summary = train(cfg, resume=bool(args.resume), from_step=args.from_step)
    if int(os.environ.get("RANK", "0")) == 0:
        print(finished_line(summary, Path(cfg.run.out) / "summary.json"), flush=True)
    return 0


def finished_line(summary: dict, path: Path) -> str:
    """The one line a person reads at the end of a run; summary.json holds every field."""
    import torch

    from scalevec.train.mfu import matmul_peak
    from scalevec.train.progress import clock

    dtype = torch.bfloat16 if summary["precision"] == "bf16" else torch.float32
    peak = matmul_peak(summary["device"], dtype)
    mfu = summary["tok_per_s"] * summary["flops_per_token"] / peak
    dtype_name = str(dtype).removeprefix("torch.")
    return (f"done: val loss {summary['final_val_loss']:.4f}, {summary['tokens']:,} tokens in "
            f"{clock(summary['wall_s'])}, {summary['tok_per_s']:,.0f} tok/s, MFU {100 * mfu:.1f}% of this "
            f"device's measured {dtype_name} matmul peak ({peak / 1e9:,.0f} GFLOP/s); "
            f"summary: {shlex.quote(str(path))}")


def cmd_eval(args) -> int:
    from scalevec.data import eval_batches, resolve_data
    from scalevec.device import pick_device
    from scalevec.evaluate import evaluate
    from scalevec.train.run import load_run

    run = load_run(args.run_dir)
    cfg = run.cfg
    device = pick_device(cfg.train.device)
    spec = resolve_data(cfg.data)
    batches = eval_batches(spec.val_files, cfg.train.batch_size, cfg.train.seq_len, cfg.data.val_tokens,
                           vocab_size=spec.vocab_size)
    loss = evaluate(run.model.to(device), batches, cfg, device)
    print(json.dumps({"run": str(run.path), "step": run.step, "val_loss": loss}, indent=1))
    return 0


def cmd_info(args) -> int:
    import torch

    from scalevec.config import load_config
    from scalevec.info import count_params, scale_sites
    from scalevec.models import build_model

    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size == 0:  # no data needed to count: take the tokenizer's nominal vocabulary
        cfg.model.vocab_size = {"gpt2": 50304, "byte": 320}.get(cfg.data.tokenizer, cfg.data.vocab_size)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.scale)
    counts = count_params(model)
    sites = scale_sites(model)
    out = {"model": cfg.model.preset, "strategy": cfg.scale.strategy, "strategy_doc": cfg.scale.describe(),
           "count_convention": "preset names count non-embedding parameters (no token embedding, no LM head)",
           "vocab_size": cfg.model.vocab_size, **counts, "scale_sites": sites}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"model {cfg.model.preset} ({cfg.model.style}), strategy {cfg.scale.strategy}: {cfg.scale.describe()}")
    print(f"  total params          {counts['total']:>15,}")
    print(f"  non-embedding params  {counts['non_embedding']:>15,}   (the preset name counts these)")
    for k in ("active", "active_non_embedding"):
        if k in counts:
            print(f"  {k.replace('_', '-') + ' params':<22}{counts[k]:>15,}")
    print(f"  scale-vector params   {counts['scale_vector']:>15,}   share {counts['scale_vector_share']:.2e}")
    for role, n in counts["by_role"].items():
        print(f"    {role:<20}{n:>15,}")
    print(f"  scale-vector sites ({len(sites)}):")
    seen: dict[tuple, int] = {}
    for s in sites:
        key = (s["slot"], s["role"], s["param"])
        seen[key] = seen.get(key, 0) + 1
    for (slot, role, param), n in seen.items():
        print(f"    {slot:<22} {role:<13} {param:<6} x{n}")
    return 0


def cmd_demo(args) -> int:
    from scalevec.demo import run_demo

    return run_demo(Path(args.out), args.overrides, steps=args.steps)


def cmd_theory(args) -> int:
    from scalevec.theory import main

    return main(args.rest)


def _usage(msg: str) -> Exception:
    from scalevec.typed_config import ConfigError

    return ConfigError(msg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scalevec", description="Scale vectors in LLM pre-training (arXiv 2605.26895)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp):
        sp.add_argument("--config", help="a TOML config file (see configs/)")
        sp.add_argument("overrides", nargs="*", help=CONFIG_HELP)
        return sp

    with_config(sub.add_parser("prepare", help="tokenize a corpus into nanoGPT-format shards")).set_defaults(
        fn=cmd_prepare)
    tr = with_config(sub.add_parser("train", help="train a model"))
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest valid checkpoint")
    tr.add_argument("--from-step", type=int, metavar="N",
                    help="with --resume: continue from the checkpoint of step N instead (e.g. a WSD run's last one "
                         "before its decay, to extend it with a larger train.steps); newer checkpoints are set aside")
    tr.set_defaults(fn=cmd_train)
    ev = sub.add_parser("eval", help="validation loss of a run's newest checkpoint")
    ev.add_argument("run_dir")
    ev.set_defaults(fn=cmd_eval)
    info = with_config(sub.add_parser("info", help="parameter counts by role and scale-vector sites"))
    info.add_argument("--json", action="store_true")
    info.set_defaults(fn=cmd_info)
    demo = sub.add_parser("demo", help="train baseline and unified on the tiny preset and compare (CPU, minutes)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo's)")
    demo.add_argument("overrides", nargs="*", help=CONFIG_HELP)
    demo.set_defaults(fn=cmd_demo)
    th = sub.add_parser("theory", help="numerical checks of the paper's theorems", add_help=False)
    th.add_argument("rest", nargs=argparse.REMAINDER)
    th.set_defaults(fn=cmd_theory)
    for register in _extensions():
        register(sub)
    return p


def _extensions():
    """Subcommands registered beside the core ones: studies next to their feature, and scalevec.commands
    (Hugging Face export and import, sampling)."""
    out = []
    for mod in ("scalevec.study.cli", "scalevec.commands"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        out.append(module.register)
    return out


def main(argv: list[str] | None = None) -> int:
    from scalevec.typed_config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "theory":  # its own parser: argparse.REMAINDER would not pass on --help/--out
        from scalevec.theory import main as theory_main

        return theory_main(argv[1:])
    args = build_parser().parse_args(argv)
    errors: tuple[type[BaseException], ...] = (ConfigError,)
    try:
        from scalevec.data import DataError

        errors += (DataError,)
    except ImportError:
        pass
    from scalevec.train.checkpoint import CheckpointError
    from scalevec.train.errors import TrainingError, TrainingStopped

    errors += (CheckpointError, TrainingError, OSError)  # OSError: a full disk, a missing or read-only path
    try:
        return args.fn(args)
    except TrainingStopped as e:
        print("stopped: " + " ".join(str(e).split()), file=sys.stderr)
        return e.exit_code
    except errors as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:  # a second Ctrl-C in training, or any Ctrl-C elsewhere
        line = "interrupted"
        run_dir = getattr(args, "run_dir", None)
        if run_dir is not None:
            line += (": the newest complete checkpoint is intact; continue with scalevec train --resume "
                     + shlex.quote(str(run_dir)))
        print(("\n" if sys.stderr.isatty() else "") + line, file=sys.stderr)  # off the bar's line
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
