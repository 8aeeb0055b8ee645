"""Two versions of the DNP CPU kernel (``src/scalevec/ops/csrc/dnp_swiglu.cpp``) against each other, in one process.

    python benchmarks/decisions/kernel_ab.py                       # HEAD's kernel (base) vs the working tree's (candidate)
    python benchmarks/decisions/kernel_ab.py --base 117a869 --rows 1024 --width 3328

Both sources are built as separate operator libraries and loaded side by side; forward and backward calls of the
two alternate (the order reversed every other round), and each ratio is the median of per-round candidate/base
ratios. ``cold`` evicts the caches before every call (a 64 MiB sweep, as a preceding matmul's traffic would),
``warm`` calls on inputs already in cache. It first prints how far the candidate's outputs are from the base's:
a change meant to be exact in arithmetic shows rounding differences only (a few bf16 ulps at most).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from scalevec.ops.dnp_swiglu import CSRC, compile_flags

SOURCE = CSRC / "dnp_swiglu.cpp"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def source_at(rev: str) -> str:
    """The kernel's source at a git revision, or the working tree's for ``rev=''``."""
    if not rev:
        return SOURCE.read_text()

    def git(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(CSRC), *cmd], check=False, capture_output=True, text=True)

    top = git("rev-parse", "--show-toplevel")
    out = git("show", f"{rev}:{SOURCE.relative_to(Path(top.stdout.strip()))}") if top.returncode == 0 else top
    if out.returncode != 0:
        sys.exit(f"kernel_ab.py: cannot read {SOURCE.name} at revision {rev!r} (not a git checkout, or no such "
                 f"revision or file there)")
    return out.stdout


def build(source: str, namespace: str, workdir: Path):
    """Builds ``source`` with its operators renamed into ``namespace``; returns ``torch.ops.<namespace>``."""
    renamed = re.sub(r"TORCH_LIBRARY(_IMPL)?\(scalevec\b", rf"TORCH_LIBRARY\1({namespace}", source)
    path = workdir / f"{namespace}.cpp"
    path.write_text(renamed)
    load(name=namespace, sources=[str(path)], extra_cflags=compile_flags(),
         extra_ldflags=["-fopenmp"], is_python_module=False, build_directory=str(workdir), verbose=False)
    return getattr(torch.ops, namespace)


def alternate(calls: dict[str, Callable[[], object]], rounds: int, before: Callable[[], None]) -> dict[str, list]:
    for f in calls.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            before()
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="git revision of the base kernel")
    p.add_argument("--candidate", default="", help="git revision of the candidate (default: the working tree)")
    p.add_argument("--rows", type=int, default=2048, help="tokens (tiny: 16 x 128)")
    p.add_argument("--width", type=int, default=512, help="d_ff, the width of each branch (tiny: 512)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--rounds", type=int, default=300)
    args = p.parse_args()
    for flag in ("rows", "width", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: must be >= 1")
    sources = {"base": source_at(args.base), "candidate": source_at(args.candidate)}
    with tempfile.TemporaryDirectory(prefix="kernel_ab_") as tmp:
        ops = {k: build(src, f"kernel_ab_{k}", Path(tmp)) for k, src in sources.items()}
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    gate_up = (3 * torch.randn(args.rows, 2 * args.width, generator=g)).to(dtype)
    gain = 1 + 0.3 * torch.randn(args.width, generator=g)
    dh = torch.randn(args.rows, args.width, generator=g).to(dtype)
    eps = 1e-6

    out = {k: o.dnp_swiglu(gate_up, gain, eps) for k, o in ops.items()}
    grads = {k: o.dnp_swiglu_backward(dh, gate_up, gain, out[k][1]) for k, o in ops.items()}
    print(f"kernel_ab: base {args.base or 'working tree'} vs candidate {args.candidate or 'working tree'}; "
          f"{args.rows} x {args.width} {args.dtype}, threads={torch.get_num_threads()}, torch={torch.__version__}")
    for name, a, b in (("h", out["base"][0], out["candidate"][0]), ("dgate_up", grads["base"][0], grads["candidate"][0]),
                       ("dgain", grads["base"][1], grads["candidate"][1])):
        diff = (a.float() - b.float()).abs().max().item()
        print(f"  candidate - base, max |diff| of {name}: {diff:.3g} (max |base| {a.float().abs().max().item():.3g})")

    sweep = torch.empty(16 * 2**20)  # 64 MiB, twice this machine's last-level cache
    kinds = {
        "fwd": lambda o: lambda: o.dnp_swiglu(gate_up, gain, eps),
        "bwd": lambda o: lambda: o.dnp_swiglu_backward(dh, gate_up, gain, out["base"][1]),
    }
    print(f"  medians of {args.rounds} alternating calls each; ratio: median of per-round candidate/base")
    for kind, make in kinds.items():
        for cache, before in (("cold", lambda: sweep.add_(1.0)), ("warm", lambda: None)):
            t = alternate({k: make(o) for k, o in ops.items()}, args.rounds, before)
            ratio = statistics.median(c / b for c, b in zip(t["candidate"], t["base"]))
            print(f"  {kind} {cache}: base {1e6 * statistics.median(t['base']):7.1f} us  candidate "
                  f"{1e6 * statistics.median(t['candidate']):7.1f} us  ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
