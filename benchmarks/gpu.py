"""The GPU check, one step per process (``gpu.sh`` runs each under a timeout; docs/performance.md, "GPU").

    python benchmarks/gpu.py preflight    versions, APIs, imports, data: one line, exit 2 if anything is missing
    python benchmarks/gpu.py a|b|c|d|e    one phase; writes $OUT/gpu_<phase>.json as its parts finish
    python benchmarks/gpu.py summary DIR  (on CPU, afterwards) the phases' headline numbers as a table

Phases: a, correctness (gpu_correct.py); b, c, d, dense 0.12b, moe-0.12b and 1b speed and memory (gpu_speed.py);
e, a short multi-seed training comparison (gpu_train.py).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

TORCH_FLOOR = "2.10"  # pyproject's floor: F.grouped_mm is public from it
# What the phases import, from the project and from the image (tomli_w: carried; the trainer writes config.toml).
MODULES = ("numpy", "safetensors", "tokenizers", "tomli_w", "scalevec.config", "scalevec.models",
           "scalevec.models.moe", "scalevec.optim", "scalevec.data", "scalevec.train.trainer", "scalevec.train.run",
           "scalevec.cli", "harness", "gpu_common", "gpu_correct", "gpu_speed", "gpu_train")


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def problems() -> str | None:
    """The first thing missing for the phases, as one line; None when nothing is."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        return f"cannot import torch ({first_line(e)}); set PY to the Python of the GPU image"
    try:
        from gpu_common import DATA, DEVICE, OUT
    except Exception as e:  # noqa: BLE001 - any import failure, whatever its kind, is the one line
        return f"cannot import gpu_common ({first_line(e)})"

    if torch.__version__ < TORCH_FLOOR:
        return f"torch {torch.__version__} is older than {TORCH_FLOOR}"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    for name, ok in (("torch.nn.functional.grouped_mm", hasattr(F, "grouped_mm")),
                     ("torch.optim.Muon", hasattr(torch.optim, "Muon"))):
        if not ok:
            return f"torch {torch.__version__} has no {name}"
    for name in (*MODULES, *(("triton",) if DEVICE == "cuda" else ())):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure, whatever its kind, is the one line
            return f"cannot import {name} ({first_line(e)})"
    meta = DATA / "meta.json"
    if not meta.is_file():
        return f"no prepared corpus at {DATA} (make gpu-prep on CPU, then carry .cache/gpu)"
    m = json.loads(meta.read_text())
    for f in (*m["train_shards"], *m["val_shards"]):
        if not (DATA / f).is_file():
            return f"{DATA / f} is missing (make gpu-prep again and carry .cache/gpu)"
    try:
        from gpu_common import data_config

        from scalevec.data import resolve_data

        resolve_data(data_config())
    except Exception as e:  # noqa: BLE001 - the loader's own validation, whatever it raises
        return f"the corpus at {DATA} does not load ({first_line(e)})"
    try:  # the grouped matmul MoE dispatch needs, in its dtype, on this device
        x = torch.randn(32, 16, device=DEVICE, dtype=torch.bfloat16)
        w = torch.randn(2, 16, 16, device=DEVICE, dtype=torch.bfloat16)
        F.grouped_mm(x, w, offs=torch.tensor([16, 32], device=DEVICE, dtype=torch.int32))
    except Exception as e:  # noqa: BLE001 - an unsupported device or build, whatever it raises
        return f"F.grouped_mm fails on {DEVICE} ({first_line(e)})"
    try:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / ".write-test").write_text("")
        (OUT / ".write-test").unlink()
    except OSError as e:
        return f"cannot write to OUT={OUT} ({e.strerror or e})"
    return None


def preflight() -> int:
    t0 = time.perf_counter()
    try:
        problem = problems()
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the preflight's answer is one line
        problem = f"{type(e).__name__}: {first_line(e)}"
    if problem:
        print(f"gpu preflight: {problem}", flush=True)
        return 2
    import platform

    import torch
    from gpu_common import DEVICE, Result

    res = Result("preflight", python=platform.python_version(), cuda=torch.version.cuda)
    if DEVICE == "cuda":
        import triton

        props = torch.cuda.get_device_properties()
        res.update(triton=triton.__version__, capability=list(torch.cuda.get_device_capability()),
                   memory_bytes=props.total_memory, sms=props.multi_processor_count)
    res.done()
    print(f"gpu preflight: ok ({res['device']}, torch {torch.__version__}, {time.perf_counter() - t0:.1f} s)",
          flush=True)
    return 0


def main() -> int:
    args = sys.argv[1:]
    if not args:
        print(__doc__)
        return 2
    if args[0] == "preflight":
        return preflight()
    if args[0] == "summary":
        from gpu_summary import summary

        return summary(Path(args[1]) if len(args) > 1 else None)
    phases = {"a": ("gpu_correct", "main"), "b": ("gpu_speed", "phase_b"), "c": ("gpu_speed", "phase_c"),
              "d": ("gpu_speed", "phase_d"), "e": ("gpu_train", "main")}
    if args[0] not in phases:
        print(f"gpu.py: unknown step {args[0]!r}; steps: preflight, {', '.join(phases)}, summary", flush=True)
        return 2
    from gpu_common import setup

    setup()
    module, fn = phases[args[0]]
    return getattr(importlib.import_module(module), fn)()


if __name__ == "__main__":
    sys.exit(main())
