"""Finding the first step whose loss or gradient norm is not finite, without reading the device every step.

The loop asks at its logging, evaluation and checkpoint steps (and at the end); the step, its loss, its norm
and which parameters' gradients were not finite are kept on the device from the step that first went wrong.
Nothing a run writes can hold a non-finite step: each write asks first.
"""

from __future__ import annotations

import torch


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

    def __init__(self, optimizer, params: list[torch.nn.Parameter], device: torch.device):
        names = {id(p): (g["role"], n) for g in optimizer.param_groups
                 for n, p in zip(g["names"], g["params"], strict=True)}
        self.params = params
        self.labels = [names.get(id(p), ("unknown", "?")) for p in params]
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
        first: dict[str, str] = {}
        for (role, name), bad in zip(self.labels, self.bad.tolist(), strict=True):
            if bad and role not in first:
                first[role] = name
        return step, loss, norm, [f"{role} (first: {name})" for role, name in first.items()]
