"""``scalevec export`` and ``scalevec import``: a run to and from a transformers model directory."""

from __future__ import annotations

import argparse
import shlex

from scalevec.commands.sample import run_tokenizer
from scalevec.typed_config import ConfigError

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names: torch loads only when a command runs
ARCHS = ("auto", "native", "custom")  # scalevec.hf.ARCHS, named here so that --help does not load torch


def cmd_export(args) -> int:
    import torch

    from scalevec.hf import export_hf
    from scalevec.train.run import load_run

    run = load_run(args.run_dir)
    try:
        tok = run_tokenizer(run)
    except ConfigError:
        tok = None  # the weights are still worth exporting; the note says no tokenizer was written
    for line in export_hf(run.model, args.out, tok, getattr(torch, args.dtype), args.arch):
        print(line)
    return 0


def cmd_import(args) -> int:
    from scalevec.hf import describe_changes, import_run

    strategy, *overrides = args.strategy
    if "=" in strategy:
        raise ConfigError(f"--strategy: expected a preset name first, got {strategy!r}")
    imp = import_run(args.hf_dir, args.out, strategy, overrides, args.allow_function_change)
    c, check = imp.cfg, imp.check
    m = c.model
    print(f"imported {imp.architecture} ({m.d_model}d x {m.n_layers} layers, vocab {m.vocab_size}) "
          f"as strategy {c.scale.strategy!r} into {args.out}")
    for note in imp.notes:
        print(f"  {note}")
    diff = (f"max |Δlogit| {check['max_abs_logit_diff']:.2e}, KL {check['kl_per_token']:.2e} nats/token, "
            f"loss {check['loss_checkpoint']:.4f} -> {check['loss_imported']:.4f} "
            f"on {check['tokens']} random tokens")
    if imp.changed:
        print(f"  function CHANGED at {describe_changes(imp.changed)}")
        print(f"  measured: {diff}")
    else:
        print(f"  function preserved: {diff}")
    print(f"continue training with: scalevec train --resume {shlex.quote(str(args.out))} train.steps=N")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="write a run as a transformers model directory (gains folded)")
    ex.add_argument("run_dir")
    ex.add_argument("--format", choices=["hf"], default="hf")
    ex.add_argument("--out", required=True, help="output folder (must not hold a model yet)")
    ex.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    ex.add_argument("--arch", choices=ARCHS, default="auto",
                    help="native: the class transformers ships for the model style (LlamaForCausalLM, "
                         "Qwen3ForCausalLM, Gemma3ForCausalLM), refused where a DNP norm has no place in it; "
                         "custom: ScalevecForCausalLM, custom code written into the folder "
                         "(trust_remote_code=True); auto: native where exact, else custom")
    ex.set_defaults(fn=cmd_export)

    im = sub.add_parser("import", help="a local LlamaForCausalLM / Qwen3ForCausalLM directory as a new run")
    im.add_argument("hf_dir")
    im.add_argument("--strategy", nargs="+", default=["baseline"], metavar=("NAME", "KEY=VALUE"),
                    help="a strategy preset, then run-config overrides, e.g. --strategy unified "
                         "scale.mlp.placement=dual data.source=corpus.txt")
    im.add_argument("--out", required=True, help="the new run folder")
    im.add_argument("--allow-function-change", action="store_true",
                    help="apply a strategy that is not a pure reparameterisation (DNP) and report the change")
    im.set_defaults(fn=cmd_import)
