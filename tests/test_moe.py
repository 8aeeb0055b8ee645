"""MoE: routing against a naive per-token loop, dropless dispatch, load balancing, the strategy inside experts
(roles, folding), batched Muon against ``torch.optim.Muon``, presets and counts, training with the trainer."""

from __future__ import annotations

import contextlib
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from scalevec.config import load_config
from scalevec.fold import fold
from scalevec.info import count_params
from scalevec.models import build_model, dispatch, model_preset
from scalevec.models.config import MODEL_PRESETS, ModelConfig, MoEConfig
from scalevec.models.moe import MoE, active_params, expert_load_metrics, moe_layers
from scalevec.muon_batched import BatchedMuon
from scalevec.ops import dnp_swiglu as kernel_ops
from scalevec.roles import SCALE_ROLES, Role, param_roles, role_of
from scalevec.scale import gains
from scalevec.strategy import preset
from scalevec.typed_config import ConfigError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: OpenMP's spinning threads only slow them down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cfg(**moe) -> ModelConfig:
    mc = ModelConfig(preset="custom", d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=64, max_seq_len=64)
    mc.moe = MoEConfig(**{"num_experts": 4, "top_k": 2, "d_expert": 16, **moe})
    return mc


def strategy(name: str, per_expert: bool = False):
    s = preset(name)
    if per_expert:
        s.expert_gains = "per_expert"
    return s


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its initial value (gains near 1), so no gain is trivially the identity."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.3 * noise if role_of(p) in SCALE_ROLES else 0.3 * noise)


@torch.no_grad()
def naive(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per token, per selected expert, gains applied to activations: an independent reading of the layer."""
    def gain(v, e):
        if v is None:
            return 1.0
        v = v() if callable(v) else v
        return v[e] if v.dim() == 2 else v

    d, ins, outs = m.d_model, m.gains.inputs(), m.gains.outputs()
    h = F.rms_norm(x, (d,), m.gains.shared_input(), m.eps).reshape(-1, d)
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        v = h[t] * gain(m.router_in, 0)
        logits = (m.router @ v) * gain(m.router_out, 0)
        scores = logits.softmax(-1) if m.score == "softmax" else logits.sigmoid()
        select = scores + m.expert_bias if m.bias_rate else scores
        top = sorted(range(m.num_experts), key=lambda e: -select[e].item())[: m.top_k]
        w = scores[top]
        if m.renorm:
            w = w / w.sum()
        pairs = [*zip(top, w * m.route_scale), *((m.num_experts + s, 1.0) for s in range(m.num_shared))]
        for e, we in pairs:
            branch = {}
            for b, W in (("gate", m.w_gate), ("up", m.w_up)):
                y = W[e] @ (h[t] * gain(ins.get(b), e))
                if m.has_norm:
                    y = F.rms_norm(y, (m.d_expert,), None, m.eps)
                branch[b] = y * gain(outs.get(b), e)
            out[t] += we * (m.w_down[e] @ (F.silu(branch["gate"]) * branch["up"]))
    return out.view_as(x)


CASES = [
    ("baseline", {}, False),
    ("unified", {"num_shared": 1, "score": "sigmoid"}, False),
    ("dp", {"route_scale": 2.5, "renorm": False}, False),
    ("unified", {"num_shared": 1}, True),
    ("hg", {"top_k": 1, "renorm": False}, False),
]


@pytest.mark.parametrize(("name", "moe", "per_expert"), CASES)
def test_routing_matches_naive_loop(name, moe, per_expert):
    m = MoE(small_cfg(**moe), strategy(name, per_expert))
    randomize(m)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    ref = naive(m, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
    # The per-expert loop fallback (unaligned shapes, fp32 under compile) computes the same thing.
    orig = dispatch.grouped_ok
    try:
        dispatch.grouped_ok = lambda *a: False
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
    finally:
        dispatch.grouped_ok = orig


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "pytorch"])
def test_shared_dnp_gains_take_dnp_swiglu_with_the_same_gradients(kernel, request):
    """DNP with gains shared by the experts runs ``dnp_swiglu`` (γ_up in W_down); output and every gradient
    equal those of the per-branch formulation (``F.rms_norm``, gains on the activations)."""
    if kernel:
        request.getfixturevalue("cpu_kernel")
    m = MoE(small_cfg(num_shared=1), strategy("unified"))
    assert m.uses_dnp_swiglu
    randomize(m)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    w = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))

    def run():
        m.zero_grad()
        with contextlib.nullcontext() if kernel else kernel_ops.disabled():
            y = m(x)
        (y * w).sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    y, grads = run()
    m.uses_dnp_swiglu = False
    y_ref, grads_ref = run()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        # Up to rounding, relative to each tensor's scale: some entries are exact cancellations (the magnitude of an
        # input gain whose branches are normalised has zero gradient) and keep fp32 noise of the terms summed.
        scale = max(1.0, grads_ref[n].abs().max().item())
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_padded_groups_match_unpadded():
    """Both devices pad every expert's group to an aligned row count (zeros, the buffer's tail in the last group);
    the result and the gradients must not change, and every padded row stays zero."""
    g = torch.Generator().manual_seed(0)
    xs, w = torch.randn(11, 8, generator=g), torch.randn(4, 12, 8, generator=g)
    counts = torch.tensor([3, 0, 7, 1])
    eid = torch.repeat_interleave(torch.arange(4), counts)
    ref = torch.stack([w[e] @ x for e, x in zip(eid, xs)])
    grads = []
    for align in (1, 8):
        groups = dispatch.PaddedGroups(counts, eid, align)
        assert groups.capacity % align == 0 and bool((groups.offs.diff() % align == 0).all())
        x_, w_ = xs.clone().requires_grad_(), w.clone().requires_grad_()
        yp = groups.mm_padded(groups.pad(x_), w_)
        pad_rows = torch.ones(groups.capacity, dtype=torch.bool)
        pad_rows[groups.pos] = False
        assert bool((yp[pad_rows] == 0).all())
        y = groups.unpad(yp)
        torch.testing.assert_close(y, ref)
        y.square().sum().backward()
        grads.append((x_.grad, w_.grad))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(("name", "per_expert"), [("baseline", False), ("unified", False), ("unified", True)],
                         ids=["baseline", "unified-dnp-kernel", "unified-per-expert"])
def test_cpu_group_padding_changes_nothing_but_speed(name, per_expert):
    """A layer with groups padded to CPU_GROUP_ROWS (row-wise ops running on the padded layout between the two
    projections) equals one with none, forward and backward."""
    m = MoE(small_cfg(num_shared=1), strategy(name, per_expert))
    randomize(m)
    assert m.cpu_group_rows == dispatch.CPU_GROUP_ROWS > 1
    assert dispatch.grouped_ok(torch.device("cpu"), torch.float32, m.d_model, m.d_expert)  # the padded path runs
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4))
    out = []
    for rows in (1, dispatch.CPU_GROUP_ROWS):
        m.cpu_group_rows = rows
        m.zero_grad()
        y = m(x)
        y.square().sum().backward()
        out.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
    for n, grad in out[0][1].items():
        torch.testing.assert_close(out[1][1][n], grad, rtol=1e-4, atol=1e-5, msg=n)  # sums over more rows


def test_dropless_when_every_token_picks_the_same_experts():
    m = MoE(small_cfg(bias_rate=1e-3), preset("baseline"))
    randomize(m)
    with torch.no_grad():
        m.expert_bias.copy_(torch.tensor([0.0, 0.0, 50.0, 100.0]))  # experts 3 and 2 win every token
    x = torch.randn(3, 7, 32)
    y = m(x)
    assert m.bias_counts.tolist() == [0, 0, 21, 21]  # all 21 tokens reached both experts: no capacity
    torch.testing.assert_close(y, naive(m, x), rtol=1e-4, atol=1e-5)
    assert bool((y.abs().sum(-1) > 0).all())


def test_gradients_reach_router_experts_and_gains():
    model = build_model(small_cfg(num_shared=1), strategy("unified", per_expert=True))
    x = torch.randint(0, 64, (2, 9))
    (model(x, x) + model.aux_loss()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_balance_loss_is_minimal_for_uniform_routing():
    m = MoE(small_cfg(num_experts=8, top_k=2), preset("baseline"))
    N = 64
    uniform = torch.full((N, 8), 1 / 8)
    idx = torch.arange(N * 2).view(N, 2) % 8  # every expert gets the same share
    assert m._balance_loss(uniform, idx, 1).item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    for scope in ("micro_batch", "sequence"):
        m.aux_scope = scope
        for temp in (0.5, 2.0, 8.0):
            scores = (torch.randn(N, 8, generator=g) * temp).softmax(-1)
            idx = scores.topk(2).indices
            assert m._balance_loss(scores, idx, 4).item() >= 1 - 1e-6
    skewed = torch.tensor([0.7, 0.2] + [0.1 / 6] * 6).expand(N, 8)
    assert m._balance_loss(skewed, skewed.topk(2).indices, 4).item() > 2


def test_aux_loss_carries_coefficients_and_none_when_disabled():
    x = torch.randn(2, 4, 32)
    m = MoE(small_cfg(aux_coef=0.0, z_coef=0.0), preset("baseline"))
    m(x)
    assert m.last_aux_loss is None
    m = MoE(small_cfg(aux_coef=0.5, z_coef=0.0), preset("baseline"))
    m(x)
    _, scores, idx, _ = m.route(F.rms_norm(x, (32,), m.gains.shared_input(), m.eps).reshape(-1, 32))
    assert m.last_aux_loss.item() == pytest.approx(0.5 * m._balance_loss(scores, idx, 2).item())


@pytest.mark.parametrize(("score", "ratio"), [("softmax", 0.5), ("sigmoid", 0.2)])
def test_loss_free_bias_moves_load_toward_uniform(score, ratio):
    torch.manual_seed(0)
    cfg = small_cfg(num_experts=8, top_k=2, aux_coef=0.0, z_coef=0.0, bias_rate=0.002, score=score)
    m = MoE(cfg, preset("baseline"))
    u = F.normalize(torch.randn(32), dim=0)
    with torch.no_grad():  # a router that sends most tokens to experts 0 and 1
        m.router[0] += 3 * u
        m.router[1] += 2 * u
    x = torch.randn(4, 64, 32) + u
    cvs = []
    with torch.no_grad():
        for _ in range(200):
            m(x)
            c = m.bias_counts.float()
            cvs.append((c.std(unbiased=False) / c.mean()).item())
            m.after_optimizer_step()
    late = sum(cvs[-20:]) / 20  # the sign rule ends in a small limit cycle: average over it
    assert cvs[0] > 1.0 and late < ratio * cvs[0], (cvs[0], late)
    assert abs(m.expert_bias.sum().item()) < 1e-4  # re-centred


def test_eval_metrics_report_load_and_reset():
    model = build_model(small_cfg(first_dense=1), preset("baseline"))
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 16)))
    layer = moe_layers(model)[0]
    stats = layer.load_stats(reset=False)
    assert sum(stats["load"]) == pytest.approx(1.0) and stats["load_cv"] >= 0 and stats["balance_loss"] >= 1 - 1e-6
    row = layer.eval_metrics()
    assert {f"moe/1/{k}" for k in ("load", "load_cv", "max_vio", "balance_loss", "z_loss", "aux_loss")} == set(row)
    assert layer.load_stats() is None and expert_load_metrics(model) == {}


def test_first_dense_and_roles():
    model = build_model(small_cfg(first_dense=1, num_shared=1), strategy("unified", per_expert=True))
    roles = param_roles(model)
    assert not isinstance(model.blocks[0].ffn, MoE) and isinstance(model.blocks[1].ffn, MoE)
    ffn = "blocks.1.ffn."
    for w in ("w_gate", "w_up", "w_down"):
        assert roles[ffn + w] == Role.EXPERT_MATRIX and dict(model.named_parameters())[ffn + w].shape[0] == 5
    assert roles[ffn + "router"] == Role.ROUTER
    slot_roles = {name: sv.role for name, sv, _ in gains(model.blocks[1].ffn)}  # outside blocks: name = slot
    assert slot_roles == {"mlp.gate.in": Role.INPUT_SCALE, "mlp.up.in": Role.INPUT_SCALE,
                          "mlp.gate.out": Role.OUTPUT_SCALE, "mlp.up.out": Role.INPUT_SCALE,
                          "router.in": Role.INPUT_SCALE}
    assert model.blocks[1].ffn.gains.inputs()["gate"].shape == (5, 32)  # one γ per expert
    assert model.blocks[1].ffn.gains.out_gains["up"]().shape == (5, 16)


@pytest.mark.parametrize(("name", "per_expert", "moe"), [
    ("baseline", False, {}), ("hg", False, {"num_shared": 1}), ("dp", False, {}), ("dnp", False, {}),
    ("er", False, {"score": "sigmoid"}), ("unified", False, {"num_shared": 1, "first_dense": 1}),
    ("unified", True, {"num_shared": 1}),
])
def test_fold_preserves_logits(name, per_expert, moe):
    cfg = small_cfg(**moe)
    cfg.style = "gemma"
    model = build_model(cfg, strategy(name, per_expert))
    randomize(model)
    with torch.no_grad():
        model.blocks[-1].ffn.expert_bias.normal_()  # copied as a buffer; unused here (bias_rate = 0)
    folded = fold(model)
    x = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    kept = {m.slot for m in folded.modules() if hasattr(m, "slot") and m.slot.startswith(("mlp", "router"))}
    assert kept <= {"mlp.gate.out", "mlp.up.out"}  # only DNP's γ_a survives inside the MoE


def test_router_norm_placement_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"^scale.router.placement: 'dual_norm' puts a norm over router logits"):
        load_config(overrides=["model.preset=moe-tiny", "scale.router.placement=dual_norm"])


@pytest.mark.parametrize("shape", [(4, 24, 16), (3, 16, 40), (2, 3, 8, 8)])
@pytest.mark.parametrize(("nesterov", "adjust"), [(True, None), (False, "match_rms_adamw")])
def test_batched_muon_equals_torch_muon_per_slice(shape, nesterov, adjust):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=g)
    batched = torch.nn.Parameter(w0.clone())
    slices = [torch.nn.Parameter(s.clone()) for s in w0.reshape(-1, *shape[-2:])]
    kw = {"lr": 0.05, "weight_decay": 0.1, "momentum": 0.9, "nesterov": nesterov, "adjust_lr_fn": adjust}
    ours, ref = BatchedMuon([batched], **kw), torch.optim.Muon(slices, **kw)
    for _ in range(5):
        grad = torch.randn(shape, generator=g)
        batched.grad = grad.clone()
        for p, s in zip(slices, grad.reshape(-1, *shape[-2:])):
            p.grad = s.clone()
        ours.step()
        ref.step()
        # Newton–Schulz runs in bf16 as in torch's Muon; batched and single GEMMs may round one bf16 ulp apart.
        torch.testing.assert_close(batched.detach(), torch.stack([p.detach() for p in slices]).view(shape),
                                   rtol=0, atol=0.05 * 2**-6)
    for p, s in zip(slices, ours.state[batched]["momentum_buffer"].reshape(-1, *shape[-2:])):
        torch.testing.assert_close(ref.state[p]["momentum_buffer"], s)


def test_newton_schulz_matches_torch_exactly_on_each_slice():
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz

    from scalevec.muon_batched import zeropower_batched

    coef = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    for shape in ((3, 24, 16), (3, 16, 24)):
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        ref = torch.stack([_zeropower_via_newtonschulz(s, coef, 5, 1e-7) for s in grad])
        assert torch.equal(zeropower_batched(grad, coef, 5, 1e-7), ref)


@pytest.mark.slow
def test_compile_fullgraph_under_bf16_autocast():
    m = MoE(small_cfg(num_shared=1, bias_rate=1e-3), preset("unified"))
    x = torch.randn(2, 8, 32)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
        y.float().sum().backward()
        ref = m(x)
    torch.testing.assert_close(y, ref)
    assert m.bias_counts.sum().item() == 2 * 2 * 16  # the compiled forward updated the buffer too
    assert m.router.grad is not None


def test_presets_counts_and_config_errors():
    assert {"moe-tiny", "moe-0.5b"} <= set(MODEL_PRESETS)
    dense, moe_tiny = model_preset("tiny"), model_preset("moe-tiny")
    for c in (dense, moe_tiny):
        c.vocab_size = 4096
    with torch.device("meta"):
        a, b = build_model(dense, preset("baseline")), build_model(moe_tiny, preset("baseline"))
    ca, cb = count_params(a), {**count_params(b), **active_params(b)}
    # Active non-embedding = the dense preset's, plus the router (E x d per layer).
    assert cb["active_non_embedding"] == ca["non_embedding"] + 4 * 8 * 128
    assert cb["non_embedding"] == cb["active_non_embedding"] + 4 * 6 * 3 * 128 * 256
    with pytest.raises(ConfigError, match="model.moe.top_k"):
        load_config(None, ["model.preset=moe-tiny", "model.moe.top_k=9"])
    cfg = load_config(None, ["model.preset=moe-0.5b", "model.moe.num_shared=1"])
    assert cfg.model.moe.num_experts == 16 and cfg.model.moe.num_shared == 1 and cfg.model.d_model == 1280


# ---- training through the trainer -----------------------------------------------------------------------------

FAST = ["model.preset=moe-tiny", "train.batch_size=8", "train.seq_len=64", "train.progress=false",
        "train.log_every=5", "data.val_tokens=8192", "train.threads=1"]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_moe_unified_muon_learns_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from scalevec.train import train
    from scalevec.train.checkpoint import list_checkpoints

    args = [*FAST, "scale.strategy=unified", "optim.name=muon", "train.steps=30", "train.eval_every=15",
            "train.ckpt_every=15", "train.keep_ckpts=5", "model.moe.bias_rate=1e-3", "model.moe.num_shared=1"]
    run = tmp_path / "run"
    train(load_config(None, [*args, f"run.out={run}"]))
    rows = _metrics(run)
    vals = [r for r in rows if "val_loss" in r]
    chance = math.log(load_config(None, FAST).data.vocab_size)
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] < chance - 1.5, (vals, chance)
    assert "moe/0/load_cv" in vals[0] and "aux_loss" in rows[0]
    final = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert any(k.endswith("expert_bias") and final[k].abs().sum() > 0 for k in final)
    shutil.rmtree(list_checkpoints(run)[-1])
    train(load_config(None, [*args, f"run.out={run}"]), resume=True)

    def timeless(rs):
        return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in rs]

    assert timeless(_metrics(run)) == timeless(rows)
    again = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    for k in final:
        assert torch.equal(again[k], final[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_moe_two_ranks_match_single_process(tmp_path, mode):
    """2 ranks x batch 4 = 1 process x batch 8, with expert bias (counts all-reduced) and per-sequence balance
    (the micro-batch scope balances each rank's own tokens, so it differs by design). AdamW: Muon's bf16
    Newton–Schulz turns reduction-order ulps into routing flips, so it agrees only to ~1e-3."""
    import os
    import subprocess
    import sys

    import numpy as np

    from scalevec.train import train

    common = [*FAST, "train.steps=4", "train.log_every=1", "train.precision=fp32", "train.eval_every=0",
              "scale.strategy=unified", "model.moe.num_shared=1", "model.moe.bias_rate=1e-2",
              "model.moe.aux_scope=sequence"]
    single = tmp_path / "single"
    train(load_config(None, [*common, "train.batch_size=8", f"run.out={single}"]))
    dist = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "scalevec",
           "train", *common, "train.batch_size=4", f"dist.mode={mode}", f"run.out={dist}"]
    r = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    a = [x["train_loss"] for x in _metrics(single) if "train_loss" in x]
    b = [x["train_loss"] for x in _metrics(dist) if "train_loss" in x]
    np.testing.assert_allclose(b, a, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_sorted_rows_gradient_equals_index_select(k):
    """The dispatch permutation's gather backward equals autograd's scatter-add through ``index_select``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    src = torch.randperm(5 * k, generator=g)
    inv = torch.empty_like(src).scatter_(0, src, torch.arange(5 * k))
    w = torch.randn(5 * k, 4, generator=g, dtype=torch.float64)
    y = dispatch.SortedRows.apply(x, src, inv, k)
    (gx,) = torch.autograd.grad((y * w).sum(), x)
    y_ref = x.index_select(0, src // k)
    (gx_ref,) = torch.autograd.grad((y_ref * w).sum(), x)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    assert torch.autograd.gradcheck(lambda t: dispatch.SortedRows.apply(t, src, inv, k), (x,))
