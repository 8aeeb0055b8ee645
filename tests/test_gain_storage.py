"""How gains are stored: one tensor per gain, HG's input gains as the rows of one, and the older layouts (model
and optimizer state) that still load."""

from __future__ import annotations

import pytest
import torch

from scalevec.config import OptimConfig, load_config
from scalevec.info import scale_sites
from scalevec.layers import SiteGains
from scalevec.models import build_model, model_preset
from scalevec.models.config import MoEConfig
from scalevec.optim import build_optimizer
from scalevec.roles import SCALE_ROLES, Role, role_of
from scalevec.scale import ScaleVector
from scalevec.strategy import preset
from scalevec.train.checkpoint import CheckpointError
from scalevec.train.distributed import DistInfo
from scalevec.train.state import load_states
from scalevec.typed_config import ConfigError


def tiny(strategy: str, **moe):
    mc = model_preset("tiny")
    mc.vocab_size, mc.d_model, mc.n_layers, mc.n_kv_heads, mc.d_ff = 96, 64, 2, 2, 128
    scale = preset(strategy)
    if moe:
        mc.moe = MoEConfig(num_experts=4, top_k=2, d_expert=32, num_shared=1)
        scale.expert_gains = "per_expert"
    torch.manual_seed(0)
    return build_model(mc, scale)


@torch.no_grad()
def perturb_gains(model) -> None:
    """Move every gain off its init, so a load that mixed up two gains cannot give the same logits."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if role_of(p) in SCALE_ROLES:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def slot_roles(model) -> dict[str, Role]:
    return {s["slot"]: Role(s["role"]) for s in scale_sites(model)}


def test_every_gain_is_one_tensor_and_hg_rows_share_one():
    m = tiny("unified")
    assert all(len(list(sv.parameters())) == 1 for sv in m.modules() if isinstance(sv, ScaleVector))
    gains_ = m.blocks[0].attn.qkv.gains
    # q/k/v input gains: one (3, d + 1) tensor (OR's α and m side by side); one output gain per branch
    assert dict(gains_.named_parameters()).keys() == {"in_gain.packed", "out_gains.q.packed",
                                                        "out_gains.k.packed", "out_gains.v.packed"}
    assert gains_.in_gain.packed.shape == (3, 64 + 1)
    assert gains_.out_gains["q"].packed.shape == (64 + 1,) and gains_.out_gains["k"].packed.shape == (32 + 1,)


def test_hg_input_gains_with_different_roles_are_refused():
    cfg = load_config(overrides=["scale.strategy=unified", "scale.roles={'attn.v.in'='output'}"])
    mc = model_preset("tiny")
    mc.vocab_size = 64
    with pytest.raises(ConfigError, match=r"attn.q.in, attn.k.in, attn.v.in are one tensor .* one role"):
        build_model(mc, cfg.scale)
    cfg = load_config(overrides=["scale.strategy=unified",
                                 "scale.roles={'attn.q.in'='output','attn.k.in'='output','attn.v.in'='output'}"])
    assert slot_roles(build_model(mc, cfg.scale))["attn.k.in"] == Role.OUTPUT_SCALE


def test_hg_rows_update_like_separate_tensors():
    """AdamW on a (branch, α|m) tensor takes the steps it takes on a separate α and m per branch."""
    sv = ScaleVector(8, "or", Role.INPUT_SCALE, lead=(3,))
    with torch.no_grad():
        sv.packed.mul_(torch.rand(3, 9, generator=torch.Generator().manual_seed(0)) + 0.5)
    sep = [t.detach().clone().requires_grad_() for r in sv.packed for t in (r[:8], r[8:])]

    def reference(a, m):  # PAPER.md §3: γ = m · √d · α/‖α‖
        return m * 8 ** 0.5 * a / a.norm()

    targets = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    opt_g = torch.optim.AdamW(sv.parameters(), lr=0.05, weight_decay=0.1)
    opt_s = torch.optim.AdamW(sep, lr=0.05, weight_decay=0.1)
    for _ in range(5):
        for opt, gam in ((opt_g, list(sv())), (opt_s, [reference(sep[2 * i], sep[2 * i + 1]) for i in range(3)])):
            opt.zero_grad()
            sum(((g - t) ** 2).sum() for g, t in zip(gam, targets)).backward()
            opt.step()
    for i in range(3):
        torch.testing.assert_close(sv()[i], reference(sep[2 * i], sep[2 * i + 1]).detach())


def _older_layout(model, grouped: bool) -> dict[str, torch.Tensor]:
    """``model``'s state dict in a layout before ``SiteGains``: the gains beside the weights (``in_scale``,
    ``in_scales``, ``out_scales``), with branch gains of equal size and role as the rows of one tensor named by
    the branches joined with ``_`` (``grouped``), or one tensor per branch with OR/ER's α and m apart."""
    sd = dict(model.state_dict())
    for path, m in model.named_modules():
        if isinstance(m, SiteGains):
            _older_site(sd, path, m, grouped)
    return sd


def _older_site(sd: dict, path: str, m: SiteGains, grouped: bool) -> None:
    site = path.removesuffix("gains")

    def put(where, t, sv):
        if sv.param == "plain":
            sd[f"{site}{where}.gamma"] = t
        elif grouped:
            sd[f"{site}{where}.packed"] = t
        else:
            sd[f"{site}{where}.direction"], sd[f"{site}{where}.magnitude"] = t[..., : sv.dim], t[..., sv.dim:]

    def pop(key, sv):
        return sd.pop(f"{path}.{key}.{'gamma' if sv.param == 'plain' else 'packed'}")

    if m.in_gain is not None:
        t = pop("in_gain", m.in_gain)
        if not m.per_branch_input:
            put("in_scale", t, m.in_gain)
        elif grouped:
            put("in_scales." + "_".join(m.branches), t, m.in_gain)
        else:
            for b, row in zip(m.branches, t):
                put(f"in_scales.{b}", row, m.in_gain)
    groups: dict[object, list[str]] = {}
    for b, sv in m.out_gains.items():
        groups.setdefault((sv.dim, sv.role) if grouped else b, []).append(b)
    for members in groups.values():
        sv = m.out_gains[members[0]]
        rows = [pop(f"out_gains.{b}", sv) for b in members]
        put("out_scales." + "_".join(members), torch.stack(rows) if grouped else rows[0], sv)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "one-per-branch"])
@pytest.mark.parametrize("strategy", ["baseline", "hg", "dp", "or", "er", "unified"])
def test_checkpoint_in_an_older_gain_layout_loads(strategy, grouped):
    m = tiny(strategy)
    perturb_gains(m)
    old = _older_layout(m, grouped)
    assert not any(".gains." in k for k in old)
    fresh = tiny(strategy)
    fresh.load_state_dict(old, strict=True)
    x = torch.randint(0, 96, (2, 12))
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "one-per-branch"])
@pytest.mark.parametrize("strategy", ["hg", "unified"])
def test_moe_checkpoint_in_an_older_gain_layout_loads(strategy, grouped):
    """Per-expert gains keep their expert dimension through the older layouts."""
    m = tiny(strategy, moe=True)
    perturb_gains(m)
    old = _older_layout(m, grouped)
    key = next(k for k in old if k.startswith("blocks.0.ffn.in_scales."))
    assert old[key].shape[int(grouped)] == 5  # (branch, expert, d) grouped, (expert, d) per branch
    fresh = tiny(strategy, moe=True)
    fresh.load_state_dict(old, strict=True)
    x = torch.randint(0, 96, (2, 12))
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


def test_grouped_layout_holds_k_and_v_in_one_tensor():
    """The grouped layout as it was written: GQA's k and v γ_a share a (2, d + 1) tensor, q has its own."""
    old = _older_layout(tiny("unified"), grouped=True)
    pre = "blocks.0.attn.qkv."
    assert old[pre + "out_scales.k_v.packed"].shape == (2, 32 + 1) and old[pre + "out_scales.q.packed"].dim() == 2
    assert old[pre + "in_scales.q_k_v.packed"].shape == (3, 64 + 1)


def test_an_older_layout_that_does_not_fit_fails_in_one_line():
    m = tiny("unified")
    old = _older_layout(m, grouped=True)
    pre = "blocks.0.attn.qkv."
    old[pre + "out_scales.k_v.packed"] = old[pre + "out_scales.k_v.packed"][:1]  # one row for two branches
    with pytest.raises(ValueError, match=r"out_scales.k_v.packed: shape \(1, 33\) is neither .* this layout keeps"):
        tiny("unified").load_state_dict(old)


def _grouped_optimizer_state(model, opt) -> dict:
    """``opt``'s state as the older layout saved it: a site's output gains of equal size and role (adjacent in
    their group) as the rows of one tensor."""
    names = {id(p): n for n, p in model.named_parameters()}
    saved, out = opt.state_dict(), {}
    for key, o in opt.optimizers.items():
        state, groups, new = saved[key]["state"], [], {}
        for group, saved_group in zip(o.param_groups, saved[key]["param_groups"]):
            runs: list[tuple[object, list[int]]] = []
            for p, i in zip(group["params"], saved_group["params"]):
                n = names[id(p)]
                k = (n.split(".gains.out_gains.")[0], p.shape) if ".gains.out_gains." in n else None
                if k is not None and runs and runs[-1][0] == k:
                    runs[-1][1].append(i)
                else:
                    runs.append((k, [i]))
            ids = []
            for k, members in runs:
                first = state[members[0]]
                new[len(new)] = first if k is None else \
                    {s: torch.stack([state[i][s] for i in members]) if v.dim() else v for s, v in first.items()}
                ids.append(len(new) - 1)
            groups.append({**saved_group, "params": ids})
        out[key] = {"state": new, "param_groups": groups}
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_state_of_grouped_gains_resumes_on_one_gain_per_branch(optimizer):
    m = tiny("unified")
    opt = build_optimizer(m, OptimConfig(name=optimizer), "input")
    for _ in range(2):
        m(torch.randint(0, 96, (2, 12))).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    old_model, old_optim = _older_layout(m, grouped=True), _grouped_optimizer_state(m, opt)
    assert len(old_optim["adamw"]["state"]) < len(opt.state_dict()["adamw"]["state"])  # k_v was one tensor
    fresh = tiny("unified")
    fresh_opt = build_optimizer(fresh, OptimConfig(name=optimizer), "input")
    load_states(fresh, fresh_opt, old_model, old_optim, "ddp", DistInfo())
    want, got = opt.state_dict(), fresh_opt.state_dict()
    for key in want:
        assert want[key]["param_groups"] == got[key]["param_groups"]
        for i, st in want[key]["state"].items():
            assert all(torch.equal(v, got[key]["state"][i][s]) for s, v in st.items())
    with pytest.raises(CheckpointError, match="fits neither one gain per branch .* nor rows of branch gains"):
        bad = _grouped_optimizer_state(m, opt)
        bad["adamw"]["state"][0] = {s: torch.cat([v, v]) if v.dim() else v for s, v in bad["adamw"]["state"][0].items()}
        load_states(tiny("unified"), build_optimizer(tiny("unified"), OptimConfig(name=optimizer), "input"),
                    old_model, bad, "ddp", DistInfo())
