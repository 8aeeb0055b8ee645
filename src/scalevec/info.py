"""Parameter accounting by role, and the list of scale-vector sites (what ``scalevec info`` prints)."""

from __future__ import annotations

from collections import Counter

from torch import nn

from scalevec.roles import SCALE_ROLES, Role, param_roles
from scalevec.scale import gain_modules

EMBEDDING_ROLES = (Role.EMBEDDING, Role.HEAD)


def count_params(model: nn.Module) -> dict:
    """Total, non-embedding (no token embedding, no LM head), per role, and the scale-vector share."""
    roles = param_roles(model)
    params = dict(model.named_parameters())
    by_role: Counter[str] = Counter()
    for name, r in roles.items():
        by_role[r.value] += params[name].numel()
    total = sum(by_role.values())
    scale = sum(by_role[r.value] for r in SCALE_ROLES)
    non_emb = total - sum(by_role[r.value] for r in EMBEDDING_ROLES)
    out = {"total": total, "non_embedding": non_emb, "scale_vector": scale,
           "scale_vector_share": scale / total if total else 0.0, "by_role": dict(by_role)}
    active = getattr(model, "active_params", None)
    if callable(active):
        out.update(active())
    return out


def scale_sites(model: nn.Module) -> list[dict]:
    """Every scale vector, one per branch: its name (as in ``metrics.jsonl`` and the plots), the module that
    holds it, its slot (the ``scale.roles`` key), role, parameterisation and size."""
    out = []
    for name, module, sv, row in gain_modules(model):
        numel = sum(p.numel() if row is None else p[row].numel() for p in sv.parameters())  # HG: its row
        slot = sv.slot if row is None else sv.slot.split(",")[row]
        out.append({"name": name, "module": module, "slot": slot, "role": sv.role.value, "param": sv.param,
                    "numel": numel})
    return out
