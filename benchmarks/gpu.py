"""The GPU check (run by ``gpu.sh``): the 0.12B preset on one CUDA device with bf16 autocast and torch.compile.

1. tokens/s and MFU of the baseline and unified strategies (MFU against the device's measured bf16 matmul peak
   and, for H100/H200, the datasheet dense bf16 peak);
2. unified / baseline step-time ratio (interleaved rounds, median of per-round ratios) and peak-memory ratio
   (``torch.cuda.max_memory_allocated`` over a training step: weights, AdamW state, activations, workspace);
3. a short loss comparison: both strategies from the same init on the same batches of the prepared default
   data (cosine schedule), validation loss at the end.

Results go to ``--out`` (JSON) and stdout; ``docs/performance.md`` cites ``benchmarks/results/gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch._dynamo
from harness import Shape, Step, build, flops_per_token, interleaved, matmul_peak, median, ratio

from scalevec.config import OptimConfig, ScheduleConfig
from scalevec.optim import build_optimizer, lr_factor, set_lr
from scalevec.strategy import preset

DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak, SXM


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def peak_memory(step: Step) -> int | None:
    if step.x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def loss_comparison(shape: Shape, steps: dict[str, Step], n_steps: int, lr: float, device: str) -> dict:
    """Re-initialise both (already compiled) models in place and train them on the same real batches."""
    from scalevec.config import DataConfig
    from scalevec.data import TokenLoader, eval_batches, resolve_data

    spec = resolve_data(DataConfig())
    loader = TokenLoader(spec.train_files, shape.batch, shape.seq, seed=0, vocab_size=shape.vocab)
    evals = eval_batches(spec.val_files, shape.batch, shape.seq, 262_144, vocab_size=shape.vocab)
    optim, sched = OptimConfig(lr=lr), ScheduleConfig()
    for strategy, step in steps.items():
        fresh = build(shape, strategy, device=device)
        with torch.no_grad():
            for p, q in zip(step.model.parameters(), fresh.parameters()):
                p.copy_(q)
        step.optimizer = build_optimizer(step.model, optim, preset(strategy).weight_decay)
    curves: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(n_steps):
        x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
        for strategy, step in steps.items():
            set_lr(step.optimizer, lr_factor(i, n_steps, sched), optim)
            step.x, step.y = x, y
            curves[strategy].append(step())
    out = {}
    for strategy, step in steps.items():
        step.model.eval()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            val = [step.model(x.to(device), y.to(device)).float().item() for x, y in evals]
        step.model.train()
        tail = curves[strategy][-50:]
        out[strategy] = {"val_loss": sum(val) / len(val), "train_loss_last50": sum(tail) / len(tail)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="steps per candidate per round")
    p.add_argument("--train-steps", type=int, default=300, help="steps of the loss comparison (0: skip)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    p.add_argument("--device", default="cuda", help="'cpu' with --preset tiny: a smoke test of this script")
    p.add_argument("--preset", default="0.12b")
    args = p.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.py: no CUDA device visible to this Python")
    torch._dynamo.config.recompile_limit = 64
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t_start = time.perf_counter()
    measured_peak = matmul_peak(torch.bfloat16, n=8192 if device == "cuda" else 2048, reps=20, device=device)
    shape = Shape(args.preset, args.preset, args.batch, args.seq)
    mc = shape.model_config()
    fpt = flops_per_token(mc, shape.seq)["total"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)
    y = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)
    steps, compile_s = {}, {}
    for strategy in ("baseline", "unified"):
        step = Step(build(shape, strategy, device=device), x, y, "bf16", True, strategy)
        t0 = time.perf_counter()
        step()
        sync()
        compile_s[strategy] = time.perf_counter() - t0
        steps[strategy] = step
    memory = {k: peak_memory(s) for k, s in steps.items()}
    times = interleaved(steps, args.rounds, args.steps, sync=sync)
    tok_s = {k: shape.tokens / median(v) for k, v in times.items()}
    sheet = datasheet_peak(name)
    result = {
        "device": name, "torch": torch.__version__, "shape": {"preset": "0.12b", "batch": shape.batch,
                                                                "seq": shape.seq, "vocab": shape.vocab},
        "flops_per_token": fpt, "measured_bf16_peak_flops": measured_peak, "datasheet_bf16_peak_flops": sheet,
        "compile_s": compile_s, "tok_per_s": tok_s,
        "mfu_measured_peak": {k: v * fpt / measured_peak for k, v in tok_s.items()},
        "mfu_datasheet_peak": {k: v * fpt / sheet for k, v in tok_s.items()} if sheet else None,
        "time_ratio": ratio(times, "unified", "baseline"),
        "peak_memory_bytes": memory,
        "memory_ratio": memory["unified"] / memory["baseline"] if memory["baseline"] else None,
    }
    print(json.dumps(result, indent=1), flush=True)
    if args.train_steps:
        result["loss"] = loss_comparison(shape, steps, args.train_steps, args.lr, device)
        result["loss"]["steps"], result["loss"]["tokens"] = args.train_steps, args.train_steps * shape.tokens
        print(json.dumps(result["loss"], indent=1), flush=True)
    result["wall_s"] = time.perf_counter() - t_start
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    u, b = result["tok_per_s"]["unified"], result["tok_per_s"]["baseline"]
    mem = f"{result['memory_ratio']:.3f}" if result["memory_ratio"] else "n/a"
    print(f"\n{name}: {args.preset} bf16+compile, {shape.tokens} tokens/step: baseline {b:,.0f} tok/s "
          f"(MFU {100 * result['mfu_measured_peak']['baseline']:.1f}% of measured {measured_peak / 1e12:.1f} "
          f"TFLOP/s), unified {u:,.0f} tok/s; time ratio {result['time_ratio']:.3f}, memory ratio {mem}; "
          f"wall {result['wall_s']:.0f} s -> {args.out}")
    if "loss" in result and not all(math.isfinite(v["val_loss"]) for k, v in result["loss"].items()
                                    if isinstance(v, dict)):
        raise SystemExit("non-finite validation loss")


if __name__ == "__main__":
    main()
