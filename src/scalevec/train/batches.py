"""A run's data: the training loader of this rank, the fixed held-out batches, and the vocabulary they fix."""

from __future__ import annotations

from dataclasses import dataclass

import scalevec.train.distributed as D
from scalevec.config import Config, ConfigError


def pad_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def resolve_vocab(cfg: Config, data_vocab: int) -> None:
    """Fill ``model.vocab_size`` from the tokenizer, and record the tokenizer's vocabulary in ``data.vocab_size``
    wherever the key did not set it (another tokenizer, existing shards, a BPE that ran out of merges), so that
    a run's config.toml says what was used. A BPE short of its target is the same BPE asked for that size."""
    d = cfg.data
    if d.train_bin or d.tokenizer != "bpe" or data_vocab < d.vocab_size:
        d.vocab_size = data_vocab
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = pad_vocab(data_vocab)
    elif cfg.model.vocab_size < data_vocab:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is below the tokenizer's {data_vocab}")


@dataclass
class Batches:
    spec: object  # scalevec.data's DataSpec: files, vocabulary, tokenizer folder
    loader: object
    eval_set: list
    vocab_note: str  # said in the data line when the BPE came out smaller than asked


def load_batches(cfg: Config, info: D.DistInfo) -> Batches:
    """The main rank prepares the data (tokenizing a corpus once); the others then read what it wrote."""
    from scalevec.data import TokenLoader, eval_batches, resolve_data

    if info.main:
        spec = resolve_data(cfg.data)
    D.barrier(info)
    if not info.main:
        spec = resolve_data(cfg.data)
    asked = cfg.data.vocab_size if cfg.data.tokenizer == "bpe" and not cfg.data.train_bin else None
    resolve_vocab(cfg, spec.vocab_size)
    t = cfg.train
    # Ids are checked against the tokenizer's vocabulary, not the padded embedding: an id in the padding
    # would train silently on rows no tokenizer ever emits.
    loader = TokenLoader(spec.train_files, t.batch_size, t.seq_len, seed=cfg.data.seed, rank=info.rank,
                         world_size=info.world_size, vocab_size=spec.vocab_size)
    evals = eval_batches(spec.val_files, t.batch_size, t.seq_len, cfg.data.val_tokens,
                         vocab_size=spec.vocab_size)
    short = f" (the BPE ran out of merges short of the {asked:,} asked for)" if asked and asked > spec.vocab_size \
        else ""
    return Batches(spec, loader, evals, short)
