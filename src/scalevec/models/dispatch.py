"""Sort-based dropless dispatch of MoE tokens: the (token, slot) assignments sorted by expert, each expert's rows
one group of ``F.grouped_mm`` (no capacity, no host sync); shapes it cannot take fall back to a loop over
experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# On CPU ``grouped_mm`` builds and caches a oneDNN kernel per row count, and training changes every expert's row
# count every step: groups padded to a multiple of this many rows keep the shapes few and cached.
CPU_GROUP_ROWS = 32


def expert_groups(counts: torch.Tensor, eid: torch.Tensor, dtype: torch.dtype, dims: tuple[int, ...],
                  cpu_rows: int = CPU_GROUP_ROWS) -> PaddedGroups | LoopGroups:
    """The layout of rows sorted by expert (``counts`` rows each, expert ids ``eid``) for the grouped matmuls."""
    if not grouped_ok(eid.device, dtype, *dims):
        return LoopGroups(counts)
    # CUDA: each group starts 16-byte aligned (the weight-gradient GEMM slices rows); CPU: see CPU_GROUP_ROWS.
    return PaddedGroups(counts, eid, 16 // dtype.itemsize if eid.device.type == "cuda" else cpu_rows)


class SortedRows(torch.autograd.Function):
    """``x[src // k]``: rows of ``x`` repeated ``k`` times each, then permuted by ``src`` (a permutation of
    ``range(len(x) * k)``; ``inv`` is its inverse). Autograd would scatter-add the gradient back (atomic adds
    that ``torch.compile`` cannot parallelise well on CPU); knowing ``src`` is a permutation, the backward is a
    gather by ``inv`` and a sum over the ``k`` copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, src // k if k > 1 else src)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (inv,) = ctx.saved_tensors
        g = g.index_select(0, inv)
        if ctx.k > 1:
            g = g.view(-1, ctx.k, *g.shape[1:]).sum(1)
        return g, None, None, None


def grouped_ok(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """``F.grouped_mm`` needs 16-byte-aligned strides; compiled, its fake kernel takes bf16 only."""
    align = 16 // dtype.itemsize
    if any(d % align for d in dims):
        return False
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False
    return device.type in ("cpu", "cuda")


class PaddedGroups:
    """Rows sorted by expert (``eid``, ``counts`` rows each) laid out for ``F.grouped_mm``, each expert's group
    padded with zero rows to a multiple of ``align``, in a buffer of static size (nothing waits on the host).

    The buffer's tail past the last group is zeros too and belongs to the last group, whose row count then stays
    a multiple of ``align`` as well (the capacity is one). A row-wise op may run on padded rows between two
    ``mm_padded`` calls: zero rows in, zero rows out, and zero gradients back.
    """

    def __init__(self, counts: torch.Tensor, eid: torch.Tensor, align: int = 1):
        rows = eid.numel()
        padded = (counts + align - 1) // align * align
        end = padded.cumsum(0)
        self.capacity = (rows + counts.numel() * (align - 1) + align - 1) // align * align
        self.identity = align == 1
        self.pos = torch.arange(rows, device=eid.device) - (counts.cumsum(0) - counts)[eid] + (end - padded)[eid]
        self.offs = torch.cat([end[:-1], end.new_full((1,), self.capacity)]).to(torch.int32)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else x.new_zeros(self.capacity, x.shape[1]).index_copy(0, self.pos, x)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.identity else y.index_select(0, self.pos)

    def mm_padded(self, xp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``xp[r] @ W[e(r)]ᵀ`` for every row of the padded layout; ``w``: (experts, d_out, d_in)."""
        return F.grouped_mm(xp, w.mT, offs=self.offs)


class LoopGroups:
    """Fallback for shapes or dtypes ``grouped_mm`` rejects: one matmul per expert (syncs for the sizes). There
    is no padding, so ``pad`` and ``unpad`` are the identity."""

    def __init__(self, counts: torch.Tensor):
        self.sizes = counts.tolist()

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return x

    unpad = pad

    def mm_padded(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(c, w[e]) for e, c in enumerate(x.split(self.sizes))])
