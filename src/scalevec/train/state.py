"""Full model and optimizer state dicts out of and into a model, plain, DDP-wrapped or sharded by FSDP2."""

from __future__ import annotations

from torch import nn

import scalevec.train.distributed as D
from scalevec.train.checkpoint import CheckpointError


def model_state(model: nn.Module, mode: str, info: D.DistInfo) -> dict:
    if info.enabled and mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def optim_state(model, optimizer, mode: str, info: D.DistInfo) -> dict:
    if info.enabled and mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {k: get_optimizer_state_dict(model, o, options=opts) for k, o in optimizer.optimizers.items()}
    return optimizer.state_dict()


def load_states(model, optimizer, model_state, optim_state, mode: str, info: D.DistInfo) -> None:
    if info.enabled and mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(model, model_state, options=opts)
        for k, o in optimizer.optimizers.items():
            set_optimizer_state_dict(model, o, optim_state[k], options=opts)
        return
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    tied = {"head.weights.head"} if model.cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing "
                              f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    if optim_state is not None:  # None: an imported model, the optimizer starts fresh
        optimizer.load_state_dict(optim_state)
