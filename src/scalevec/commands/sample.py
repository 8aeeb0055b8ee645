"""``scalevec sample``: text from a run's newest checkpoint with its own tokenizer."""

from __future__ import annotations

import argparse

from scalevec.typed_config import ConfigError


def run_tokenizer(run):
    """The run's tokenizer; external shards without one hold GPT-2 ids (as ``resolve_data`` reads them)."""
    if run.tokenizer is not None:
        return run.tokenizer
    if not run.cfg.data.train_bin:
        raise ConfigError(f"{run.path} has no saved tokenizer (no {run.path}/tokenizer)")
    from scalevec.data import gpt2_tokenizer

    return gpt2_tokenizer()


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
