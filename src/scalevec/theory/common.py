"""Shared pieces of the theory checks: the result record, figure specs, a tiny decoder and its toy data.

Results are data: a check returns numbers and figure *specs*; ``report`` turns them into JSON, Markdown and
PNGs, so every number and plot in the docs comes from one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from scalevec.models import ModelConfig, build_model, model_preset
from scalevec.models.decoder import Decoder
from scalevec.strategy import preset


@dataclass
class Line:
    label: str
    x: list[float]
    y: list[float]
    marker: bool = False  # points instead of a line (per-seed values, sweeps)


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line]
    logx: bool = False
    logy: bool = False
    hlines: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Figure:
    file: str  # PNG name inside the output folder
    panels: list[Panel]


@dataclass
class CheckResult:
    """One verified claim: what it says, what was measured, the tolerance it was held to, and the verdict."""

    name: str
    claim: str
    measured: dict
    tolerance: str
    passed: bool
    figures: list[Figure] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0


def tiny_config(style: str = "llama", vocab: int = 32, d_model: int = 32, n_layers: int = 2,
                n_heads: int = 2, seq_len: int = 64) -> ModelConfig:
    """A decoder small enough that hundreds of full-batch steps and Hessian-vector products stay cheap."""
    mc = model_preset("tiny")
    mc.style, mc.vocab_size, mc.d_model, mc.n_layers = style, vocab, d_model, n_layers
    mc.n_heads, mc.d_ff, mc.max_seq_len = n_heads, 2 * d_model, seq_len
    return mc


def tiny_model(strategy: str, seed: int, **cfg) -> Decoder:
    torch.manual_seed(seed)
    return build_model(tiny_config(**cfg), preset(strategy))


def lm_loss(model: Decoder, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy in the model's own dtype (``Decoder.forward`` computes it in float32)."""
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def copy_shared(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every parameter ``dst`` shares by name with ``src`` (gains ``dst`` lacks stay at their init)."""
    params = dict(src.named_parameters())
    for name, p in dst.named_parameters():
        if name in params:
            p.copy_(params[name])


def markov_chain(vocab: int, seed: int, sharpness: float = 2.0) -> torch.Tensor:
    """A random bigram transition matrix: a language with known structure and an entropy floor well above 0."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab, vocab, generator=g) * sharpness).softmax(-1)


def markov_batches(chain: torch.Tensor, n: int, batch: int, seq: int, seed: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (inputs, next-token targets) batches sampled from ``chain``; fixed by ``seed`` so runs pair up."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.empty(batch, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, chain.shape[0], (batch,), generator=g)
        for t in range(seq):
            x[:, t + 1] = torch.multinomial(chain[x[:, t]], 1, generator=g).squeeze(1)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def loglog_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log y against log x: the order of a quantity in a step size."""
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def seeds_needed(n: int) -> int:
    """At least 80% of ``n`` seeds (4 of 5, 3 of 3, 2 of 2): the bar for a claim that is statistical."""
    return max(1, math.ceil(0.8 * n - 1e-9))
