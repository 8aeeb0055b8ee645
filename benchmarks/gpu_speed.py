"""Phases b, c and d of the GPU check: baseline against unified at one preset, as the trainer steps it.

- peak memory of a training step, one model resident at a time (each is freed before the next is built, and
  anything it leaves behind is subtracted);
- step time in interleaved rounds (``harness.interleaved``) with an A/A row: the baseline measured in a second
  slot of every round, whose ratio to the first is the noise floor of the unified/baseline ratio;
- tokens/s, and MFU against the measured bf16 matmul peak and the datasheet's, FLOPs counted per matmul on the
  parameters a token passes through (``scalevec.train.mfu.flops_breakdown``: top-k and shared experts for MoE);
- compile time (cold, then with inductor's caches warm) and each strategy's top kernels by device time.

b: dense 0.12b compiled; c: moe-0.12b compiled; d: 1b eager at batch 2 x 2048 (its compile would not fit).
"""

from __future__ import annotations

import time

import torch
import torch._dynamo
from gpu_common import DEVICE, STRATEGIES, Result, datasheet_peak, pick, release, shape, sync
from harness import (
    Shape,
    Step,
    batch,
    build,
    flops_per_token,
    interleaved,
    matmul_peak,
    median,
    ratio,
    training_memory,
)

GOAL = {"time_ratio": 1.02, "memory_ratio": 1.01}  # the overhead targets (docs/performance.md)


def make_step(sh: Shape, strategy: str, compile: bool) -> tuple[Step, float]:
    """A warmed step and the seconds its first call took (the compile, when compiled)."""
    x, y = (t.to(DEVICE) for t in batch(sh))
    step = Step(build(sh, strategy, device=DEVICE), x, y, "bf16", compile, strategy)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(pick(2, 0)):
        step()
    sync()
    return step, first


def peak_memory(step: Step) -> dict:
    """Peak bytes allocated over one step with only this model resident; on CPU (no allocator statistics) the
    harness's count of state plus saved activations."""
    if DEVICE != "cuda":
        return {"peak_bytes": training_memory(step)["total"], "resident_before_bytes": 0}
    sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    sync()
    return {"peak_bytes": torch.cuda.max_memory_allocated(), "resident_before_bytes": before}


def top_kernels(step: Step, n: int = 12, steps: int = pick(3, 1)) -> list[dict]:
    """The step's kernels (device) or ops (CPU) with the most self time, per step."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    attr = "self_device_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key[:120], "ms_per_step": getattr(e, attr) / 1e3 / steps, "calls_per_step": e.count / steps}
            for e in events[:n]]


def compare(phase: str, preset: str, batch_size: int, seq: int, compile: bool, rounds: int, steps: int) -> int:
    sh = shape(preset, batch_size, seq)
    mc = sh.model_config()
    flops = flops_per_token(mc, seq)
    res = Result(phase, preset=preset, shape={"batch": batch_size, "seq": seq, "vocab": sh.vocab,
                                              "layers": mc.n_layers, "d_model": mc.d_model},
                 precision="bf16 autocast", compiled=compile, flops_per_token=flops, goal=GOAL)
    print(f"phase {phase}: {preset} on {res['device']}, batch {batch_size} x {seq}, "
          f"{'compiled' if compile else 'eager'}", flush=True)
    torch._dynamo.config.recompile_limit = 64  # one graph per distinct block shape and strategy
    peak = matmul_peak(torch.bfloat16, n=pick(8192, 256), reps=pick(20, 3), device=DEVICE)
    res.update(measured_bf16_peak_flops=peak, datasheet_bf16_peak_flops=datasheet_peak(res["device"]))

    memory, first_call, cands = {}, {}, {}
    for s in STRATEGIES:  # one model resident at a time; the last one stays for the timing
        if cands:
            cands.clear()
            release()
        left = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0  # anything the freed model left behind
        cands[s], first_call[s] = make_step(sh, s, compile)
        memory[s] = {**peak_memory(cands[s]), "left_before_build_bytes": left}
        memory[s]["own_peak_bytes"] = memory[s]["peak_bytes"] - left
        res.update(memory=memory, first_call_s=first_call)
        res.save()
    res["memory_ratio"] = memory["unified"]["own_peak_bytes"] / memory["baseline"]["own_peak_bytes"]
    print(f"  peak memory unified/baseline {res['memory_ratio']:.4f}; first call "
          + ", ".join(f"{k} {v:.1f} s" for k, v in first_call.items()), flush=True)

    warm = [s for s in STRATEGIES if s not in cands]  # built again, with inductor's caches warm
    for s in warm:
        cands[s], f = make_step(sh, s, compile)
        res.setdefault("first_call_warm_cache_s", {})[s] = f
    times = interleaved({"baseline": cands["baseline"], "unified": cands["unified"],
                         "baseline (A/A)": cands["baseline"]}, rounds, steps, warmup=pick(2, 0), sync=sync)
    tok_s = {k: sh.tokens / median(v) for k, v in times.items()}
    sheet = res["datasheet_bf16_peak_flops"]
    res.update(rounds=rounds, steps_per_round=steps, step_s=times, tok_per_s=tok_s,
               time_ratio=ratio(times, "unified", "baseline"), aa_ratio=ratio(times, "baseline (A/A)", "baseline"),
               mfu_measured_peak={k: v * flops["total"] / peak for k, v in tok_s.items()},
               mfu_datasheet_peak={k: v * flops["total"] / sheet for k, v in tok_s.items()} if sheet else None)
    res["meets_goal"] = res["time_ratio"] <= GOAL["time_ratio"] and res["memory_ratio"] <= GOAL["memory_ratio"]
    res.save()
    print(f"  tok/s baseline {tok_s['baseline']:,.0f} unified {tok_s['unified']:,.0f}; time ratio "
          f"{res['time_ratio']:.4f} (A/A {res['aa_ratio']:.4f}); MFU baseline "
          f"{100 * res['mfu_measured_peak']['baseline']:.1f}% of measured {peak / 1e12:.0f} TFLOP/s", flush=True)
    res["top_kernels"] = {s: top_kernels(cands[s]) for s in STRATEGIES}
    res.done()
    return 0


def phase_b() -> int:
    return compare("b", *pick(("0.12b", 16, 1024, True, 10, 5), ("tiny", 2, 32, False, 2, 1)))


def phase_c() -> int:
    return compare("c", *pick(("moe-0.12b", 16, 1024, True, 10, 5), ("moe-tiny", 2, 32, False, 2, 1)))


def phase_d() -> int:
    return compare("d", *pick(("1b", 2, 2048, False, 6, 3), ("small", 1, 64, False, 2, 1)))
