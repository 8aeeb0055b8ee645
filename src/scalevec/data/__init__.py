"""The data pipeline: documents -> tokenizer -> nanoGPT-format ``.bin`` shards -> shuffled, resumable batches.

Typical use::

    spec = resolve_data(cfg.data)  # prepares (once, cached) or points at existing shards
    loader = TokenLoader(spec.train_files, batch_size, seq_len, seed, rank, world_size, spec.vocab_size)
    x, y = loader.next_batch()
"""

from scalevec.data.common import DataError, cache_dir
from scalevec.data.corpus import (
    SHAKESPEARE_SHA256,
    Corpus,
    load_documents,
    load_shakespeare,
    load_shakespeare_corpus,
)
from scalevec.data.loader import TokenLoader, TokenStream, eval_batches
from scalevec.data.prepare import DataSpec, data_dir, prepare, resolve_data
from scalevec.data.shards import read_header, read_shard, write_shard
from scalevec.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    build_tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "SHAKESPEARE_SHA256",
    "ByteTokenizer",
    "Corpus",
    "DataError",
    "DataSpec",
    "HFTokenizer",
    "TiktokenTokenizer",
    "TokenLoader",
    "TokenStream",
    "Tokenizer",
    "build_tokenizer",
    "cache_dir",
    "data_dir",
    "eval_batches",
    "gpt2_tokenizer",
    "load_documents",
    "load_shakespeare",
    "load_shakespeare_corpus",
    "load_tokenizer",
    "prepare",
    "read_header",
    "read_shard",
    "resolve_data",
    "train_bpe",
    "write_shard",
]
