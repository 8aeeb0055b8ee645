"""Turn a source into tokenized shards once, and find the shards a run trains on.

A prepared folder holds ``train_000000.bin ...``, ``val_000000.bin ...``, the tokenizer and ``meta.json``.
``meta.json`` is removed first and written last (atomically): a folder without it is never trusted, so a
crash mid-prepare can only cost a redo, never a silently truncated dataset.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scalevec.data.common import DataError, cache_dir
from scalevec.data.corpus import SHAKESPEARE_SHA256, load_documents, source_fingerprint
from scalevec.data.shards import MAX_TOKEN_ID, read_header, write_shard
from scalevec.data.tokenizer import (
    HF_FILE,
    KIND_FILE,
    Tokenizer,
    build_tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
)
from scalevec.fileio import atomic_write_json, sha256_file
from scalevec.typed_config import ConfigError

if TYPE_CHECKING:
    from scalevec.config import DataConfig

log = logging.getLogger(__name__)

META_FILE = "meta.json"
FORMAT_VERSION = 1  # bump when the prepared layout or the tokenization changes, to invalidate caches
SHARD_TOKENS = 100_000_000  # at most this many tokens per shard (200 MB), as in modded-nanogpt
_ENCODE_BATCH = 64  # documents per encode_batch call: parallel inside tokenizers, bounded memory
# Shards from elsewhere with no tokenizer beside them are taken as GPT-2 ids (modded-nanogpt's FineWeb).
GPT2_VOCAB_SIZE, GPT2_EOT_ID = 50257, 50256


@dataclass(frozen=True)
class DataSpec:
    """What a run trains on: shard lists and the id space of their tokens."""

    train_files: list[Path]
    val_files: list[Path]
    vocab_size: int
    eot_id: int
    tokenizer_dir: Path | None  # None: external shards without a tokenizer beside them, read as GPT-2

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_dir) if self.tokenizer_dir else gpt2_tokenizer()


def resolve_data(cfg: DataConfig) -> DataSpec:
    """Existing shards when ``cfg.train_bin`` is set (validated, not copied), else ``prepare(cfg)``'s.

    For existing shards, a tokenizer saved in the folder of the first train shard (``tokenizer.json`` or
    ``tokenizer_kind.json``, as ``prepare`` writes) sets the vocabulary; without one the shards are taken
    to be GPT-2 tokens (vocab 50257, end-of-text 50256), which is what nanoGPT and modded-nanogpt write.
    """
    if cfg.train_bin:
        if not cfg.val_bin:
            raise ConfigError("data.val_bin: required with data.train_bin (a glob of validation shards)")
        train, val = _glob_shards(cfg.train_bin, "data.train_bin"), _glob_shards(cfg.val_bin, "data.val_bin")
        folder = train[0].parent
        if (folder / HF_FILE).exists() or (folder / KIND_FILE).exists():
            tok = load_tokenizer(folder)
            return DataSpec(train, val, tok.vocab_size, tok.eot_id, folder)
        return DataSpec(train, val, GPT2_VOCAB_SIZE, GPT2_EOT_ID, None)
    folder = prepare(cfg)
    meta = json.loads((folder / META_FILE).read_text())
    return DataSpec(
        [folder / n for n in meta["train_shards"]],
        [folder / n for n in meta["val_shards"]],
        meta["vocab_size"],
        meta["eot_id"],
        folder,
    )


def data_dir(cfg: DataConfig) -> Path:
    """``cfg.dir``, or ``<cache>/data/<source>-<tokenizer>-<vocab>``."""
    if cfg.dir:
        return Path(cfg.dir).expanduser()
    return cache_dir() / "data" / f"{_slug(cfg.source)}-{_tokenizer_slug(cfg)}"


def prepare(cfg: DataConfig, force: bool = False, shard_tokens: int = SHARD_TOKENS) -> Path:
    """Load, tokenize and shard ``cfg.source``; return the folder. A no-op if it is already prepared."""
    folder = data_dir(cfg)
    wanted = _identity(cfg)
    if not force and _is_prepared(folder, wanted):
        return folder

    log.info("preparing %s into %s", cfg.source, folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)  # incomplete from here on, until meta.json is rewritten
    for stale in [
        *folder.glob("train_*.bin"),
        *folder.glob("val_*.bin"),
        folder / HF_FILE,
        folder / KIND_FILE,
    ]:
        stale.unlink(missing_ok=True)

    corpus = load_documents(cfg.source, cfg)
    tok = build_tokenizer(cfg, corpus.train)
    if tok.vocab_size > MAX_TOKEN_ID + 1:
        raise DataError(f"data.tokenizer {cfg.tokenizer!r}: {tok.vocab_size} ids do not fit uint16 shards")
    train_shards, train_tokens = _write_split(folder, "train", corpus.train, tok, shard_tokens)
    val_shards, val_tokens = _write_split(folder, "val", corpus.val, tok, shard_tokens)
    tok.save(folder)
    train_chars, val_chars = corpus.chars

    meta = {
        **wanted,
        "tokenizer_kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "train_documents": len(corpus.train),
        "val_documents": len(corpus.val),
        "train_chars": train_chars,
        "val_chars": val_chars,
        "train_shards": train_shards,
        "val_shards": val_shards,
        "replaced_chars": corpus.replaced_chars,
        "corpus_sha256": SHAKESPEARE_SHA256 if cfg.source == "shakespeare" else None,
        "val_names": corpus.val_names if len(corpus.val_names) <= 100 else None,
    }
    atomic_write_json(folder / META_FILE, meta)  # last: marks the folder complete
    log.info("prepared %d train and %d val tokens in %s", train_tokens, val_tokens, folder)
    return folder


def _identity(cfg: DataConfig) -> dict[str, Any]:
    """Everything the prepared shards depend on; a folder whose meta.json matches it is reused."""
    return {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "source_fingerprint": source_fingerprint(cfg.source),
        "tokenizer": cfg.tokenizer,
        "tokenizer_fingerprint": _tokenizer_fingerprint(cfg.tokenizer),
        "bpe_vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None,
        "val_fraction": cfg.val_fraction,
        "on_bad_utf8": cfg.on_bad_utf8,
    }


def _is_prepared(folder: Path, wanted: dict[str, Any]) -> bool:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    if {k: meta.get(k) for k in wanted} != wanted:
        log.info("%s: prepared for another config; preparing again", folder)
        return False
    return all((folder / n).is_file() for n in [*meta["train_shards"], *meta["val_shards"]])


def _write_split(
    folder: Path, split: str, docs: Sequence[str], tok: Tokenizer, shard_tokens: int
) -> tuple[list[str], int]:
    """Tokenize ``docs`` as one stream, each document preceded by end-of-text, into ``<split>_NNNNNN.bin``."""
    names: list[str] = []
    pending: list[np.ndarray] = []
    pending_len = total = 0

    def flush(n: int) -> None:
        nonlocal pending, pending_len
        stream = np.concatenate(pending)
        name = f"{split}_{len(names):06d}.bin"
        write_shard(folder / name, stream[:n])
        names.append(name)
        pending, pending_len = [stream[n:]], pending_len - n

    for start in range(0, len(docs), _ENCODE_BATCH):
        stream: list[int] = []
        for ids in tok.encode_batch(docs[start : start + _ENCODE_BATCH]):
            stream.append(tok.eot_id)
            stream.extend(ids)
        pending.append(np.array(stream, dtype=np.uint32))
        pending_len += len(stream)
        total += len(stream)
        while pending_len >= shard_tokens:
            flush(shard_tokens)
    if pending_len:
        flush(pending_len)
    return names, total


def _glob_shards(pattern: str, key: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    if not files:
        raise DataError(f"{key} {pattern!r}: matches no files")
    for f in files:
        read_header(f)  # a wrong magic, version or size fails now, not hours into the run
    return files


def _slug(source: str) -> str:
    if source == "shakespeare":
        return source
    path = Path(source).expanduser().resolve()
    stem = re.sub(r"[^A-Za-z0-9._]+", "_", path.stem)[:40] or "source"
    return f"{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def _tokenizer_slug(cfg: DataConfig) -> str:
    named = {"bpe": f"bpe-{cfg.vocab_size}", "gpt2": f"gpt2-{GPT2_VOCAB_SIZE}", "byte": "byte-257"}
    return named.get(cfg.tokenizer) or f"tok_{_slug(cfg.tokenizer)}"


def _tokenizer_fingerprint(name: str) -> str | None:
    """The hash of a tokenizer file named by path, so editing it invalidates the prepared shards."""
    if name in ("bpe", "gpt2", "byte"):
        return None
    path = Path(name).expanduser()
    path = path / HF_FILE if path.is_dir() and (path / HF_FILE).exists() else path
    return sha256_file(path) if path.is_file() else None
