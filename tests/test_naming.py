"""One name per gain site across the config (``scale.roles`` slots), ``info``, ``metrics.jsonl`` and plots."""

from __future__ import annotations

import re

import pytest

from scalevec.config import load_config
from scalevec.info import scale_sites
from scalevec.models import build_model
from scalevec.roles import Role
from scalevec.scale import gain_modules, gains, scale_statistics
from scalevec.study.plots import SITE_RE

NAME = re.compile(r"^(blocks\.\d+\.)?(attn|mlp|qk_norm|post_norm|router|final)\.[a-z_.]+$")


@pytest.mark.parametrize("overrides", [["scale.strategy=baseline"], ["scale.strategy=unified"],
                                       ["scale.strategy=hg", "model.style=gemma"],
                                       ["scale.strategy=unified", "model.moe.num_experts=4"]])
def test_gain_names_are_slots_in_every_view(overrides):
    cfg = load_config(None, ["model.preset=tiny", "model.n_layers=2", "model.vocab_size=320", *overrides])
    model = build_model(cfg.model, cfg.scale)
    names = [n for n, _, _ in gains(model)]
    assert names and len(set(names)) == len(names) and all(NAME.match(n) for n in names), names
    for name, module, sv, row in gain_modules(model):
        assert name.endswith(sv.slot.split(",")[0 if row is None else row])
        if name.startswith("blocks."):  # the same block as the parameter's module
            assert module.split(".")[:2] == name.split(".")[:2]
    assert [s["name"] for s in scale_sites(model)] == names  # `scalevec info`
    keys = scale_statistics(model)
    assert {k.rsplit("/", 1)[0].removeprefix("gamma/") for k in keys} == set(names)  # metrics.jsonl
    sites = {SITE_RE.match(k).group(2) for k in keys if SITE_RE.match(k)}
    assert sites == {s["slot"] for s in scale_sites(model)}  # one plot panel per slot


def test_a_slot_name_is_the_roles_key_of_the_config():
    cfg = load_config(None, ["model.preset=tiny", "model.n_layers=1", "model.vocab_size=320",
                             "scale.strategy=unified", "scale.roles={'attn.v.out'='output'}"])
    model = build_model(cfg.model, cfg.scale)
    roles = {n: sv.role for n, sv, _ in gains(model)}
    assert roles["blocks.0.attn.v.out"] == Role.OUTPUT_SCALE and roles["blocks.0.attn.q.out"] == Role.INPUT_SCALE
