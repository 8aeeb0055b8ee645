"""Folding: multiply every pure reparameterisation (γ, HG, DP without a norm, OR/ER) into the adjacent weights.

The folded model has the same function with plain weights and only the gains that a norm separates from any
linear map (DNP's γ_a, QK-norm and post-branch gains), so it runs at zero overhead; equality of logits is the
executable form of the paper's "no extra expressivity in Pre-Norm" claim.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from scalevec.layers import OutputNorm, Site
from scalevec.strategy import folded as folded_strategy


@torch.no_grad()
def _fold_site(src: Site, dst: Site) -> None:
    for name, (w, gain) in src.folded().items():
        dst.weights[name].copy_(w)
        if gain is not None:
            dst.gains.out_gains[name].set_value(gain)


@torch.no_grad()
def _fold_output_norm(src: OutputNorm, dst: OutputNorm) -> None:
    if src.gain is not None:
        dst.gain.set_value(src.gain())


def _folders() -> dict[type, callable]:
    return {Site: _fold_site, OutputNorm: _fold_output_norm}


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """An equivalent model (new object, same dtype/device) with every foldable gain multiplied in."""
    from scalevec.models import build_model

    cfg = copy.deepcopy(model.cfg)
    head: Site = model.head
    if cfg.tie_embeddings and (head.gains.in_gain is not None or len(head.gains.out_gains)):
        cfg.tie_embeddings = False  # the head's gain makes it differ from the embedding
    new = build_model(cfg, folded_strategy(model.scale))
    ref = next(model.parameters())
    new = new.to(device=ref.device, dtype=ref.dtype)
    folders = _folders()
    handled: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(h + ".") for h in handled):
            continue
        fn = folders.get(type(m)) or getattr(m, "fold_into", None)
        if fn is None:
            continue
        dst = new.get_submodule(name)
        fn(m, dst) if type(m) in folders else fn(dst)
        handled.append(name)
    src_params = dict(model.named_parameters())
    for name, p in new.named_parameters():
        if not any(name.startswith(h + ".") for h in handled):
            p.copy_(src_params[name])
    for name, b in new.named_buffers():
        b.copy_(model.get_buffer(name))
    return new.train(model.training)
