"""Validation loss of a model on a fixed list of held-out batches."""

from __future__ import annotations

import torch
from torch import nn

from scalevec.config import Config
from scalevec.device import autocast


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, cfg: Config, device: torch.device) -> float:
    was = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in batches:
        with autocast(cfg.train.precision, device):
            total += model(x.to(device), y.to(device)).float()
    model.train(was)
    return (total / max(1, len(batches))).item()
