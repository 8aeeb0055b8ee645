"""Library core: strategies, scale vectors, roles, groups, folding, configs."""

from __future__ import annotations

import copy

import pytest
import torch

from scalevec.config import load_config
from scalevec.fold import fold
from scalevec.groups import param_groups
from scalevec.info import count_params, scale_sites
from scalevec.models import MODEL_PRESETS, build_model, model_preset
from scalevec.roles import Role, param_roles, role_of
from scalevec.scale import ScaleVector, gains
from scalevec.strategy import PRESETS, preset
from scalevec.typed_config import ConfigError

STYLES = ("llama", "gemma")


def slot_roles(model) -> dict[str, Role]:
    return {s["slot"]: Role(s["role"]) for s in scale_sites(model)}


def tiny(strategy: str, style: str = "llama", tie: bool = False, vocab: int = 96, **overrides):
    mc = model_preset("tiny")
    mc.vocab_size, mc.style, mc.tie_embeddings, mc.d_model, mc.n_layers = vocab, style, tie, 64, 2
    mc.n_kv_heads, mc.d_ff = 2, 128
    for k, v in overrides.items():
        setattr(mc, k, v)
    torch.manual_seed(0)
    return build_model(mc, preset(strategy))


def perturb_gains(model, std=0.2):
    """Move every scale-vector parameter away from its init so fold tests are not trivially at γ = 1."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if role_of(p) in (Role.INPUT_SCALE, Role.OUTPUT_SCALE):
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("strategy", PRESETS)
def test_forward_backward_every_preset(strategy, style):
    m = tiny(strategy, style)
    x = torch.randint(0, 96, (2, 12))
    loss = m(x, x.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # every scale vector receives gradient signal
    assert all(p.grad.abs().sum() > 0 for p in m.parameters() if role_of(p) in (Role.INPUT_SCALE, Role.OUTPUT_SCALE))


@pytest.mark.parametrize("param", ["plain", "or", "er"])
@pytest.mark.parametrize("init", [1.0, 0.5])
def test_gamma_equals_init(param, init):
    sv = ScaleVector(48, param, Role.INPUT_SCALE, init=init)
    torch.testing.assert_close(sv(), torch.full((48,), init))


@pytest.mark.parametrize("variant", [{"magnitude": "vector"}, {"sqrt_d": False}, {"er_exp": "elementwise"}])
def test_gamma_at_init_for_alternatives(variant):
    for param in ("or", "er"):
        sv = ScaleVector(32, param, Role.INPUT_SCALE, **variant)
        torch.testing.assert_close(sv(), torch.ones(32))


@pytest.mark.parametrize("param", ["plain", "or", "er"])
def test_set_value_round_trip(param):
    sv = ScaleVector(16, param, Role.INPUT_SCALE)
    target = torch.rand(16) + 0.5
    sv.set_value(target)
    torch.testing.assert_close(sv(), target)


def test_or_direction_has_unit_norm_times_sqrt_d():
    sv = ScaleVector(64, "or", Role.INPUT_SCALE)
    with torch.no_grad():
        sv.direction.mul_(torch.rand(64) + 0.1)
        sv.magnitude.fill_(2.0)
    assert sv().norm().item() == pytest.approx(2.0 * 64 ** 0.5, rel=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_hg_with_equal_branch_gains_equals_the_shared_gain(style):
    """HG generalises the shared gain: branch gains all set to the site's γ give the baseline's function, and
    moving one branch's gain alone changes it."""
    base, hg = tiny("baseline", style), tiny("hg", style)  # same seed: same weights
    g = torch.Generator().manual_seed(2)
    site_gain = {}
    for name, sv, _ in gains(base):
        site_gain[name] = 1 + 0.3 * torch.randn(sv.dim, generator=g)
        sv.set_value(site_gain[name])
    for name, sv, row in gains(hg):  # blocks.0.attn.q.in reads what blocks.0.attn.in gave every branch
        parts = name.split(".")
        sv.set_value(site_gain[name] if name in site_gain else site_gain[".".join(parts[:-2] + parts[-1:])], row)
    x = torch.randint(0, 96, (2, 10))
    torch.testing.assert_close(hg(x), base(x))
    q, row = next((sv, row) for name, sv, row in gains(hg) if name == "blocks.0.attn.q.in")
    q.set_value(site_gain["blocks.0.attn.in"] * (1 + 0.5 * torch.rand(q.dim, generator=g)), row)  # not uniform
    assert (hg(x) - base(x)).abs().max() > 1e-3


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("strategy", PRESETS)
@pytest.mark.parametrize("tie", [False, True])
def test_fold_equivalence(strategy, style, tie):
    m = tiny(strategy, style, tie=tie)
    perturb_gains(m)
    f = fold(m)
    x = torch.randint(0, 96, (2, 16))
    diff = (f(x) - m(x)).abs().max().item()
    assert diff < 1e-4
    # nothing foldable survives: only gains a norm separates from a linear map remain
    for name, mod in f.named_modules():
        if isinstance(mod, ScaleVector):
            assert mod.param == "plain"
            assert ".in" not in mod.slot, name
    assert count_params(f)["scale_vector"] <= count_params(m)["scale_vector"]


def test_fold_removes_all_gains_from_pure_prenorm():
    m = tiny("unified")
    m2 = tiny("hg")
    perturb_gains(m2)
    assert count_params(fold(m2))["scale_vector"] == 0
    # unified keeps DNP's γ_a on gate/up (behind a norm): the paper's non-foldable part
    slots = {mod.slot for mod in fold(m).modules() if isinstance(mod, ScaleVector)}
    assert slots == {"mlp.gate.out", "mlp.up.out"}


@pytest.mark.parametrize("strategy", PRESETS)
@pytest.mark.parametrize("style", STYLES)
def test_every_parameter_has_a_role(strategy, style):
    m = tiny(strategy, style, tie=True)
    roles = param_roles(m)
    assert len(roles) == len(list(m.parameters()))


def test_iwd_groups_split_input_and_output_gains():
    m = tiny("iwd", "gemma")
    groups = {g.role: g for g in param_groups(m, "input", 0.1)}
    assert groups[Role.INPUT_SCALE].weight_decay == 0.1
    assert groups[Role.OUTPUT_SCALE].weight_decay == 0.0
    out_names = groups[Role.OUTPUT_SCALE].names
    assert any("q_norm" in n for n in out_names) and any("post_attn" in n for n in out_names)
    assert not any("q_norm" in n or "post_" in n for n in groups[Role.INPUT_SCALE].names)


@pytest.mark.parametrize(
    "policy,inp,out", [("none", 0.0, 0.0), ("input", 0.1, 0.0), ("output", 0.0, 0.1), ("all", 0.1, 0.1)]
)
def test_decay_policies(policy, inp, out):
    groups = {g.role: g.weight_decay for g in param_groups(tiny("baseline", "gemma"), policy, 0.1)}
    assert (groups[Role.INPUT_SCALE], groups[Role.OUTPUT_SCALE]) == (inp, out)
    assert groups[Role.MATRIX] == 0.1


def test_unified_roles_follow_absorbability():
    m = tiny("unified")
    roles = slot_roles(m)
    assert roles["attn.q.in"] == Role.INPUT_SCALE
    assert roles["attn.q.out"] == Role.INPUT_SCALE  # DP: folds into W_q's rows
    assert roles["attn.k.out"] == Role.INPUT_SCALE
    assert roles["attn.v.out"] == Role.INPUT_SCALE
    assert roles["mlp.gate.out"] == Role.OUTPUT_SCALE  # behind DNP's norm, then silu: nothing absorbs it
    assert roles["mlp.up.out"] == Role.INPUT_SCALE  # behind DNP's norm, read by W_down


def test_dnp_everywhere_makes_q_k_output_gains_output_role():
    cfg = load_config(overrides=["scale.strategy=unified", "scale.attn.placement=dual_norm"])
    mc = model_preset("tiny")
    mc.vocab_size = 64
    roles = slot_roles(build_model(mc, cfg.scale))
    assert roles["attn.q.out"] == roles["attn.k.out"] == Role.OUTPUT_SCALE  # the shape of QK-norm
    assert roles["attn.v.out"] == Role.INPUT_SCALE  # W_o absorbs it


def test_role_override_by_slot():
    cfg = load_config(overrides=["scale.strategy=unified", "scale.roles={'attn.q.out'='output'}"])
    mc = model_preset("tiny")
    mc.vocab_size = 64
    m = build_model(mc, cfg.scale)
    roles = slot_roles(m)
    assert roles["attn.q.out"] == Role.OUTPUT_SCALE  # the default is Input (DP's γ_a folds into W_q)
    assert roles["attn.k.out"] == Role.INPUT_SCALE


def test_preset_plus_override_composes():
    cfg = load_config(overrides=["scale.strategy=unified", "scale.mlp.param=er", "scale.attn.placement=dual_norm"])
    assert cfg.scale.mlp.param == "er" and cfg.scale.mlp.placement == "dual_norm"
    assert cfg.scale.attn.shared is False and cfg.scale.weight_decay == "input"
    mc = model_preset("tiny")
    mc.vocab_size = 64
    m = build_model(mc, cfg.scale)
    assert {mod.param for mod in m.modules() if isinstance(mod, ScaleVector)} == {"or", "er"}


def test_resolved_config_round_trips():
    from scalevec.config import from_table

    cfg = load_config(overrides=["scale.strategy=unified", "scale.mlp.param=er", "model.preset=small",
                                 "optim.lr_mult={input_scale=2.0}"])
    import tomllib

    again = from_table(tomllib.loads(cfg.to_toml()))
    assert again == cfg


@pytest.mark.parametrize(
    "override,needle",
    [
        ("scale.strategi=unified", "scale.strategi"),
        ("model.d_model=abc", "model.d_model"),
        ("scale.strategy=nonsense", "scale.strategy"),
        ("scale.mlp.placement=triple", "scale.mlp.placement"),
        ("optim.lr=-1", "optim.lr"),
        ("train.steps=0", "train.steps"),
        ("model.n_heads=3", "model.n_heads"),
        ("scale.final.placement=dual_norm", "scale.final.placement"),
        ("scale.router.placement=norm_output", "scale.router.placement"),
        ("optim.lr_mult={bogus=2.0}", "optim.lr_mult.bogus"),
        ("model.preset=7b", "model.preset"),
        ("train.bf16=true", "train.bf16"),
    ],
)
def test_config_rejects_bad_keys(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_paper_presets_match_their_names():
    for name, target in [("0.12b", 0.12e9), ("0.5b", 0.5e9), ("1b", 1e9), ("2b", 2e9)]:
        mc = copy.deepcopy(model_preset(name))
        mc.vocab_size = 32000
        with torch.device("meta"):
            n = count_params(build_model(mc, preset("unified")))
        assert abs(n["non_embedding"] - target) / target < 0.10, name
        assert n["scale_vector_share"] < 1e-3
    assert {"tiny", "small"} <= set(MODEL_PRESETS)
    mc = model_preset("tiny")
    mc.vocab_size = 4096
    assert 0.8e6 < count_params(build_model(mc, preset("baseline")))["non_embedding"] < 1.3e6


def test_gqa_and_tied_shapes():
    m = tiny("unified", tie=True, n_kv_heads=1)
    assert m.head.weights["head"] is m.embed
    x = torch.randint(0, 96, (1, 8))
    assert m(x).shape == (1, 8, 96)


def test_deepcopy_keeps_roles():
    m = tiny("unified", tie=True)
    c = copy.deepcopy(m)
    assert param_roles(c) == param_roles(m)


@pytest.mark.parametrize("param", ["or", "er"])
def test_set_value_keeps_direction_norm_of_init(param):
    sv = ScaleVector(64, param, Role.INPUT_SCALE)
    sv.set_value(torch.rand(64) + 0.5)
    assert sv.direction.norm().item() == pytest.approx(64 ** 0.5, rel=1e-5)
