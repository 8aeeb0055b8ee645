"""Full model and optimizer state dicts out of and into a model, plain, DDP-wrapped or sharded by FSDP2."""

from __future__ import annotations

import torch
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
        if any(f".{old}." in f".{k}" for k in model_state for old in OLDER_GAINS):
            optim_state = split_grouped_gain_states(optimizer, optim_state)
        optimizer.load_state_dict(optim_state)


OLDER_GAINS = ("in_scale", "in_scales", "out_scales")  # where a site kept its gains before ``SiteGains``


def split_grouped_gain_states(optimizer, saved: dict) -> dict:
    """An optimizer state saved when a site's branch gains of equal size and role were the rows of one tensor
    (``out_scales.k_v``), for one tensor per branch (``gains.out_gains.k``, ``.v``). Each role's group keeps
    its gains in the order they had, so a saved state whose rows have the shape of the next parameters is
    split among them."""
    out = {}
    for key, opt in optimizer.optimizers.items():
        old, state, groups, new_id = saved[key], {}, [], 0
        for group, saved_group in zip(opt.param_groups, old["param_groups"], strict=True):
            params, ids = group["params"], []
            for i in saved_group["params"]:
                st, j = old["state"].get(i, {}), len(ids)
                want = params[j].shape if j < len(params) else None
                shape = next((v.shape for v in st.values() if torch.is_tensor(v) and v.dim()), want)
                if want is not None and shape == want:
                    rows = [st]
                elif want is not None and shape[1:] == want and all(p.shape == want for p in params[j:j + shape[0]]) \
                        and j + shape[0] <= len(params):
                    rows = [{k: v[r] if torch.is_tensor(v) and v.dim() else v for k, v in st.items()}
                            for r in range(shape[0])]
                else:
                    raise CheckpointError(f"optimizer state {key}: a saved tensor of shape {tuple(shape or ())} fits "
                                          f"neither one gain per branch (this layout) nor rows of branch gains of "
                                          f"equal size and role (the older one)")
                for row in rows:
                    if row:  # a parameter without state (no gradient yet) stays without
                        state[new_id] = {k: v.clone() if torch.is_tensor(v) else v for k, v in row.items()}
                    ids.append(new_id)
                    new_id += 1
            if len(ids) != len(params):
                raise CheckpointError(f"optimizer state {key}: {len(ids)} saved tensors for a group of {len(params)}, "
                                      f"in neither one gain per branch (this layout) nor the older grouped rows")
            groups.append({**saved_group, "params": ids})
        out[key] = {"state": state, "param_groups": groups}
    return out
