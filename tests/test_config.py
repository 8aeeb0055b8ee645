"""Strict typed configs from TOML files and from ``key=value`` overrides: one path, the same refusals."""

from __future__ import annotations

import pytest

from scalevec.config import load_config
from scalevec.typed_config import ConfigError, FileText, load_toml


def toml(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ('[train]\nsteps = "300"\n', "train.steps: expected an integer, got the string '300'; in TOML write it without"),
    ('[optim]\nlr = "3e-3"\n', "optim.lr: expected a number, got the string '3e-3'"),
    ('[train]\nprogress = "false"\n', "train.progress: expected true or false, got the string 'false'"),
    ('[optim]\nlr_mult = {input_scale = "2"}\n', "optim.lr_mult.input_scale: expected a number, got the string"),
    ('[optim]\nbetas = ["0.9", 0.95]\n', r"optim.betas[0]: expected a number, got the string '0.9'"),
    ('[train]\ncompile = "true"\n', "train.compile: expected true or false or 'auto', got 'true'"),
])
def test_quoted_numbers_in_toml_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(toml(tmp_path, text))
    assert message in str(err.value)


def test_the_same_text_on_the_command_line_is_parsed(tmp_path):
    cfg = load_config(None, ["train.steps=300", "optim.lr=3e-3", "train.progress=false", "optim.betas=0.9,0.95",
                             "train.compile=true", "optim.lr_mult={input_scale = 2}"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.train.progress, cfg.optim.betas, cfg.train.compile) == \
        (300, 3e-3, False, (0.9, 0.95), True)
    assert cfg.optim.lr_mult == {"input_scale": 2.0}


def test_toml_strings_where_strings_belong_load_as_plain_strings(tmp_path):
    path = toml(tmp_path, '[train]\ncompile = "auto"\nsteps = 7\n[schedule]\nname = "wsd"\n'
                          '[data]\nsource = "shakespeare"\n[scale]\nstrategy = "unified"\n')
    assert isinstance(load_toml(path)["data"]["source"], FileText)
    cfg = load_config(path, ["train.steps=9"])  # the command line wins over the file
    assert (cfg.train.compile, cfg.schedule.name, cfg.train.steps, cfg.scale.strategy) == ("auto", "wsd", 9, "unified")
    for value in (cfg.train.compile, cfg.schedule.name, cfg.data.source):
        assert type(value) is str  # what config.toml and summaries get written from


@pytest.mark.parametrize(("text", "override", "message"), [
    ("[trian]\nsteps = 5\n", None, "unknown config key 'trian' (did you mean train?)"),
    ("[train]\nstepz = 5\n", None, "unknown config key 'train.stepz' (did you mean steps?)"),
    ("[optim]\nlearning_rate = 1e-3\n", None, "unknown config key 'optim.learning_rate' (did you mean lr?)"),
    ("", "train.stepz=5", "unknown config key 'train.stepz' (did you mean steps?)"),
    ("", "train.max_steps=5", "unknown config key 'train.max_steps' (did you mean steps?)"),
    ("", "train.zzz=5", "unknown config key 'train.zzz'"),
])
def test_unknown_keys_get_a_suggestion_from_a_file_or_the_command_line(tmp_path, text, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(toml(tmp_path, text) if text else None, [override] if override else [])
    assert str(err.value) == message
