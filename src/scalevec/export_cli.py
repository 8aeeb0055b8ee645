"""``scalevec export`` / ``import`` / ``sample``: Hugging Face interop and text generation from a run."""

from __future__ import annotations

import argparse
import shlex

from scalevec.typed_config import ConfigError

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names: torch loads only when a command runs
ARCHS = ("auto", "native", "custom")  # scalevec.hf.ARCHS, named here so that --help does not load torch


def run_tokenizer(run):
    """The run's tokenizer; external shards without one hold GPT-2 ids (as ``resolve_data`` reads them)."""
    if run.tokenizer is not None:
        return run.tokenizer
    if not run.cfg.data.train_bin:
        raise ConfigError(f"{run.path} has no saved tokenizer (no {run.path}/tokenizer)")
    from scalevec.data import gpt2_tokenizer

    return gpt2_tokenizer()


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


def cmd_sample(args) -> int:
    from scalevec.device import pick_device
    from scalevec.sample import sample_text
    from scalevec.train.run import load_run

    run = load_run(args.run_dir, pick_device(args.device))
    run.tokenizer = run_tokenizer(run)
    try:
        texts = sample_text(run, args.prompt, args.num_samples, args.max_new_tokens, args.temperature,
                            args.top_k or None, args.seed, args.stop_at_eot)
    except ValueError as e:
        raise ConfigError(f"--prompt: {e}") from None
    for i, text in enumerate(texts):
        if i:
            print("-" * 40)
        print(text)
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

    sa = sub.add_parser("sample", help="generate text from a run's newest checkpoint with its own tokenizer")
    sa.add_argument("run_dir")
    sa.add_argument("--prompt", default="", help="text to continue (a new document when empty)")
    sa.add_argument("--max-new-tokens", type=int, default=200)
    sa.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    sa.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens (0: all)")
    sa.add_argument("--num-samples", type=int, default=1)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--device", default="auto", help="auto | cpu | cuda")
    sa.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction, default=True,
                    help="end a sample at the end-of-text token")
    sa.set_defaults(fn=cmd_sample)
