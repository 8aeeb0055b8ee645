"""A run's tokenizer as ``tokenizer.json`` for ``PreTrainedTokenizerFast``, and a checkpoint's as the run's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers

    from scalevec.data import HFTokenizer, Tokenizer


def hf_tokenizer(tokenizer: Tokenizer) -> tokenizers.Tokenizer | None:
    """The run's tokenizer as a ``tokenizers.Tokenizer`` with the same ids, or None if it cannot be one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from scalevec.data import HFTokenizer
    from scalevec.data.tokenizer import EOT, _gpt2_byte_decoder, _gpt2_folder

    if isinstance(tokenizer, HFTokenizer):  # bpe, or a user's tokenizer.json: a copy of it as it is
        return Tokenizer.from_str(tokenizer.tokenizer.to_str())
    char_of = {b: c for c, b in _gpt2_byte_decoder().items()}
    if tokenizer.kind == "gpt2":  # the tiktoken encoding, rebuilt from the GPT-2 files it was built from
        folder = _gpt2_folder()
        vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
        lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]  # after "#version"
        merges = [tuple(m.split()) for m in lines]
        tok = Tokenizer(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif tokenizer.kind == "byte":  # byte b -> its GPT-2 printable stand-in, with id b; no merges, no split
        tok = Tokenizer(models.BPE({char_of[b]: b for b in range(256)}, []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    else:
        return None
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def export_tokenizer(tokenizer: Tokenizer | None, out: Path, max_len: int) -> str:
    """``tokenizer.json`` + ``tokenizer_config.json`` for ``PreTrainedTokenizerFast``; returns a note."""
    from tokenizers import processors

    tok = hf_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is None:
        return "no tokenizer written: the run has none"
    eot = tok.id_to_token(tokenizer.eot_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eot, "model_max_length": max_len,
              "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"]}  # no token_type_ids: generate(**enc) works
    if tok.post_processor is None:  # an encoded text starts with end-of-text, as every training document did
        tok.post_processor = processors.TemplateProcessing(
            single=f"{eot} $A", pair=f"{eot} $A {eot} $B", special_tokens=[(eot, tokenizer.eot_id)])
        config["bos_token"] = eot
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return f"wrote the run's {tokenizer.kind} tokenizer ({tokenizer.vocab_size} ids, end-of-text {eot!r})"



def hf_dir_tokenizer(hf_dir: Path) -> tuple[HFTokenizer | None, str | None]:
    """The checkpoint's ``tokenizer.json`` as a scalevec tokenizer and None, or None and why not."""
    from scalevec.data import DataError, HFTokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return None, f"{hf_dir} has no tokenizer.json"
    try:
        return HFTokenizer.from_file(path), None
    except DataError as e:
        return None, str(e)

