"""Finding the first step whose loss or gradient norm is not finite, without reading the device every step.

The loop asks at its logging, evaluation and checkpoint steps (and at the end); the step, its loss, its norm
and which parameters' gradients were not finite are kept on the device from the step that first went wrong.
Nothing a run writes can hold a non-finite step: each write asks first.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import scalevec.train.distributed as D
from scalevec.roles import Role
from scalevec.train.errors import TrainingError

Label = tuple[str, str]  # (role, parameter name)


def param_labels(model: nn.Module, roles: dict[str, Role], params: list[nn.Parameter]) -> list[Label]:
    """The role and name of each of ``params`` (the optimizer's groups do not all keep names: Muon's drop them)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [(roles[name_of[id(p)]].value, name_of[id(p)]) for p in params]


def name_groups(labels: list[Label], bad: list) -> list[str]:
    """``role (first: name)`` for each role with a flagged parameter, in parameter order."""
    first: dict[str, str] = {}
    for (role, name), flag in zip(labels, bad, strict=True):
        if flag and role not in first:
            first[role] = name
    return [f"{role} (first: {name})" for role, name in first.items()]


def nonfinite_groups(labels: list[Label], params: list[nn.Parameter], info: D.DistInfo) -> list[str]:
    """The roles whose gradients are not finite now; a failure-path read. Sharded (FSDP) gradients are checked
    shard by shard and the flags OR-reduced, so every rank names the same groups without gathering one."""
    local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
    flags = torch.tensor([g is not None and not bool(torch.isfinite(g).all()) for g in local], dtype=torch.int32)
    if info.enabled:
        flags = flags.to(params[0].device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return name_groups(labels, flags.tolist())


def grad_norms(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The total 2-norm of ``grads`` (as ``torch.nn.utils.get_total_norm`` computes it for one device and
    dtype) and the per-tensor norms it is made of."""
    if len({(g.device, g.dtype) for g in grads}) == 1:
        norms = torch._foreach_norm(grads, 2)
    else:
        norms = [torch.linalg.vector_norm(g.float()) for g in grads]
    per = torch.stack([n.to(grads[0].device, torch.float32) for n in norms])
    return torch.linalg.vector_norm(per), per


class NonfiniteWatch:
    """The first non-finite step, recorded with device ops only; ``first()`` reads it (one host sync)."""

    def __init__(self, params: list[nn.Parameter], labels: list[Label], device: torch.device):
        self.params, self.labels = params, labels
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.values = torch.zeros(2, device=device)
        self.bad = torch.zeros(len(params), dtype=torch.bool, device=device)
        self._zero = torch.zeros((), device=device)

    def norm(self, done: int, loss: torch.Tensor) -> torch.Tensor:
        """The step's total gradient norm; records the step if it, or the loss, is not finite."""
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        total, per = grad_norms([self.params[i].grad for i in present])
        if len(present) < len(self.params):  # parameters without a gradient this step count as finite
            full = [self._zero] * len(self.params)
            for j, i in enumerate(present):
                full[i] = per[j]
            per = torch.stack(full)
        newly = ~(torch.isfinite(loss) & torch.isfinite(total)) & (self.step < 0)
        self.step = torch.where(newly, done, self.step)
        self.values = torch.where(newly, torch.stack([loss.float(), total]), self.values)
        self.bad = torch.where(newly, ~torch.isfinite(per), self.bad)
        return total

    def first(self) -> tuple[int, float, float, list[str]] | None:
        """(step, loss, grad norm, ``role (first: name)`` per group with a non-finite gradient), or None."""
        step = int(self.step)
        if step < 0:
            return None
        loss, norm = self.values.tolist()
        return step, loss, norm, name_groups(self.labels, self.bad.tolist())


def nonfinite_line(step: int, loss: float, norm: float, groups: list[str]) -> str:
    what = "loss" if not math.isfinite(loss) else "gradient"
    return (f"non-finite {what} at step {step} (loss {loss:.4g}, grad norm {norm:.4g}); groups with a non-finite "
            f"gradient norm: {'; '.join(groups)}")


def poison_grad(optimizer, role: str) -> None:
    """Test-only fault (``SCALEVEC_FAULT=nan_grad:STEP[:ROLE]``): a NaN in one gradient of group ``role``."""
    for g in optimizer.param_groups:
        if role in ("", g["role"]):
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.view(-1)[0] = math.nan
                    return
    raise TrainingError(f"SCALEVEC_FAULT nan_grad: no gradient in a group named {role!r}")
