"""Text generation with a KV cache: look at what a run has learned with nothing but its own tokenizer."""

from __future__ import annotations

import torch

from scalevec.models import Decoder, KVCache


def next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): greedy at temperature 0, else sampled from the top-k."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Decoder, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             eos_id: int | None = None) -> torch.Tensor:
    """Continue ``idx`` (B, T) by ``max_new_tokens`` tokens: one prefill pass, then one token per step.

    With ``eos_id``, a row that emits it keeps emitting it, and generation stops once every row has.
    Returns (B, T + n) with n <= ``max_new_tokens``.
    """
    B, T = idx.shape
    if T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"{T} prompt + {max_new_tokens} new tokens exceed "
                         f"model.max_seq_len={model.cfg.max_seq_len}")
    was_training = model.training
    model.eval()
    ref = next(model.parameters())
    cache = KVCache(model, B, T + max_new_tokens, device=ref.device, dtype=ref.dtype)
    logits = model(idx, cache=cache)[:, -1]
    out = [idx]
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        tok = next_token(logits, temperature, top_k, generator)
        if eos_id is not None:
            tok = tok.masked_fill(done, eos_id)
            done |= tok == eos_id
        out.append(tok[:, None])
        if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        logits = model(tok[:, None], cache=cache)[:, -1]
    model.train(was_training)
    return torch.cat(out, 1)


def sample_text(run, prompt: str, num_samples: int = 1, max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int | None = 200, seed: int = 0, stop_at_eot: bool = True) -> list[str]:
    """Continuations of ``prompt`` from a loaded run (``scalevec.train.load_run``), prompt included.

    Every training document starts with end-of-text, so the prompt does too: the model continues it as the
    beginning of a document.
    """
    tok = run.tokenizer
    device = next(run.model.parameters()).device
    ids = [tok.eot_id, *tok.encode(prompt)]
    max_new_tokens = min(max_new_tokens, run.model.cfg.max_seq_len - len(ids))
    if max_new_tokens <= 0:
        raise ValueError(f"the prompt is {len(ids)} tokens; model.max_seq_len is {run.model.cfg.max_seq_len}")
    idx = torch.tensor([ids] * num_samples, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = generate(run.model, idx, max_new_tokens, temperature, top_k, g, tok.eot_id if stop_at_eot else None)
    texts = []
    for row in out[:, 1:].tolist():
        if stop_at_eot and tok.eot_id in row[len(ids) - 1:]:
            row = row[: row.index(tok.eot_id, len(ids) - 1)]
        texts.append(tok.decode(row))
    return texts
