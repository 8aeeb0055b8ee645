"""Claim 4 of docs/paper.md: weight decay helps on Input-Norm γ (sharpness) and hurts on Output-Norm γ.

Input side: a Pre-Norm decoder trained with AdamW and the library's role-based groups, decaying the Input-Norm
gains (IWD, policy ``input``) or not (policy ``none``; matrices decay in both); then the top Hessian eigenvalue
of a held-out loss. The rescaling (cγ, W/c) leaves the function unchanged but multiplies the curvature in W by
c², so keeping γ from drifting large keeps the model flat. Output side: the QK-norm self-retrieval task of the
expressivity check, where the gain is the only handle on attention temperature; decaying it (policy ``all``)
caps the temperature and so the reachable loss, while decaying the Input gain there (``input``) costs nothing.
"""

from __future__ import annotations

import time

import torch

from scalevec.groups import param_groups
from scalevec.theory.common import (
    CheckResult,
    Figure,
    Line,
    Panel,
    lm_loss,
    markov_batches,
    markov_chain,
    seeds_needed,
    tiny_model,
)
from scalevec.theory.expressivity import retrieval_attention, tail_mean, train_retrieval
from scalevec.theory.hessian import double_backward_attention, top_hessian_eigenvalue

VOCAB, BATCH, SEQ = 32, 16, 32


def adamw(model: torch.nn.Module, policy: str, lr: float, wd: float) -> torch.optim.AdamW:
    groups = [g.as_torch(lr) for g in param_groups(model, policy, wd)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def sharpness_run(policy: str, seed: int, steps: int, lr: float, wd: float) -> dict:
    """Train a Pre-Norm decoder under a γ decay ``policy``; top Hessian eigenvalue and loss on held-out data."""
    chain = markov_chain(VOCAB, 100 + seed)
    batches = markov_batches(chain, steps, BATCH, SEQ, seed)
    held_out = markov_batches(chain, 1, 4 * BATCH, SEQ, seed + 10_000)[0]
    model = tiny_model("baseline", seed, vocab=VOCAB)
    opt = adamw(model, policy, lr, wd)
    for batch in batches:
        loss = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with double_backward_attention():
        lam, hist = top_hessian_eigenvalue(lambda: lm_loss(model, held_out), list(model.parameters()),
                                           iters=60, rtol=1e-3, seed=seed)
    with torch.no_grad():
        eval_loss = lm_loss(model, held_out).item()
    return {"lambda_max": lam, "power_iters": len(hist), "eval_loss": eval_loss,
            "last_rel_change": abs(hist[-1] - hist[-2]) / abs(hist[-1]) if len(hist) > 1 else 1.0}


def check_input_sharpness(seeds: int = 3, steps: int = 400, lr: float = 1e-2, wd: float = 0.1,
                          seed: int = 0) -> CheckResult:
    t0 = time.perf_counter()
    runs = {p: [sharpness_run(p, seed + s, steps, lr, wd) for s in range(seeds)] for p in ("none", "input")}
    lam = {p: [r["lambda_max"] for r in rs] for p, rs in runs.items()}
    flatter = sum(a < b for a, b in zip(lam["input"], lam["none"]))
    mean = {p: sum(v) / seeds for p, v in lam.items()}
    passed = mean["input"] < mean["none"] and flatter >= seeds_needed(seeds)
    all_runs = [r for rs in runs.values() for r in rs]
    seeds_x = list(range(seed, seed + seeds))
    panel = Panel(f"top Hessian eigenvalue after {steps} AdamW steps", "seed", "λ_max",
                  [Line("no decay on γ (policy none)", seeds_x, lam["none"], marker=True),
                   Line("decay on Input-Norm γ (IWD)", seeds_x, lam["input"], marker=True)])
    return CheckResult(
        name="wd_input_sharpness",
        claim="Weight decay on Input-Norm γ lowers the top Hessian eigenvalue of a Pre-Norm model.",
        measured={
            "mean_lambda_max_no_decay": mean["none"],
            "mean_lambda_max_iwd": mean["input"],
            "seeds_flatter_with_iwd": flatter,
            "lambda_max_no_decay": lam["none"],
            "lambda_max_iwd": lam["input"],
            "eval_loss_no_decay": [r["eval_loss"] for r in runs["none"]],
            "eval_loss_iwd": [r["eval_loss"] for r in runs["input"]],
            "max_power_iteration_rel_change": max(r["last_rel_change"] for r in all_runs),
        },
        tolerance=f"AdamW lr={lr:g}, wd={wd:g}, {steps} steps: mean λ_max(IWD) < mean λ_max(none) and lower in "
                  f"at least {seeds_needed(seeds)}/{seeds} seeds (power iteration to 1e-3 relative change)",
        passed=passed,
        figures=[Figure("wd_input_sharpness.png", [panel])],
        seconds=time.perf_counter() - t0,
    )


def retrieval_with_policy(policy: str, seed: int, steps: int, lr: float, wd: float) -> tuple[list[float], float]:
    """Loss curve and the final QK-norm gain product γ_q·γ_k (the attention temperature it learned)."""
    att = retrieval_attention(seed)
    curve = train_retrieval(att, adamw(att, policy, lr, wd), steps, seed)[0]
    with torch.no_grad():
        return curve, float(att.q_norm.gain().mean() * att.k_norm.gain().mean())


POLICIES = {"none": "no γ decayed", "input": "Input γ decayed (IWD)", "all": "all γ decayed (incl. QK-norm)"}


def check_output_expressivity(seeds: int = 3, steps: int = 500, lr: float = 3e-2, wd: float = 0.1,
                              seed: int = 0) -> CheckResult:
    t0 = time.perf_counter()
    runs = {p: [retrieval_with_policy(p, seed + s, steps, lr, wd) for s in range(seeds)] for p in POLICIES}
    curves = {p: [c for c, _ in rs] for p, rs in runs.items()}
    temp = {p: sum(t for _, t in rs) / seeds for p, rs in runs.items()}
    final = {p: [tail_mean(c) for c in cs] for p, cs in curves.items()}
    mean = {p: sum(v) / seeds for p, v in final.items()}
    hurt = sum(a > 1.2 * b for a, b in zip(final["all"], final["input"]))
    # IWD's own price, measured against the damage that decaying the Output gain does on the same task.
    iwd_cost = (mean["input"] - mean["none"]) / (mean["all"] - mean["none"])
    passed = mean["all"] > 1.2 * mean["input"] and hurt >= seeds_needed(seeds) and iwd_cost <= 0.1
    x = list(range(1, steps + 1))
    panel = Panel(f"QK-norm self-retrieval, AdamW wd={wd:g} (seed {seed})", "step", "−log weight on own key",
                  [Line(label, x, curves[p][0]) for p, label in POLICIES.items()], logy=True)
    return CheckResult(
        name="wd_output_expressivity",
        claim="Weight decay on an Output-Norm γ (QK-norm) limits what the model can express: the reachable "
              "loss rises; weight decay on the Input-Norm γ of the same model costs nothing.",
        measured={
            "mean_final_loss_decay_all": mean["all"],
            "mean_final_loss_iwd": mean["input"],
            "mean_final_loss_no_decay": mean["none"],
            "seeds_hurt_by_output_decay": hurt,
            "iwd_cost_over_output_decay_cost": iwd_cost,
            "mean_qk_gain_product_decay_all": temp["all"],
            "mean_qk_gain_product_iwd": temp["input"],
        },
        tolerance=f"AdamW lr={lr:g}, wd={wd:g}, {steps} steps, mean of last 10% of steps: loss(all) > 1.2 × "
                  f"loss(IWD) on average and in at least {seeds_needed(seeds)}/{seeds} seeds; "
                  "loss(IWD) − loss(none) ≤ 10% of loss(all) − loss(none)",
        passed=passed,
        figures=[Figure("wd_output_expressivity.png", [panel])],
        seconds=time.perf_counter() - t0,
    )
