"""What `dpokit` reports as the user's error (one line, exit 2) and what it lets through as a bug (a
traceback), and config values of the wrong shape refused at load time."""

from __future__ import annotations

import pytest

from dpokit import cli
from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig


@pytest.mark.parametrize("key,value", [("loss", 3), ("loss_weights", 1.0), ("reward", True),
                                       ("reward_weights", {"a": 1}), ("loss", ["sigmoid", {"x": 1}])])
def test_str_or_list_fields_refuse_other_values(tmp_path, key, value):
    import yaml
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(ConfigError, match=rf"c.yaml: {key} expects a comma-separated string or a list"):
        TrainConfig.from_yaml(str(path))


def test_str_or_list_fields_take_strings_and_lists():
    cfg = TrainConfig.from_dict({"loss": ["sigmoid", "sft"], "loss_weights": [1, 0.5]})
    assert cfg.loss_names == ["sigmoid", "sft"] and cfg.loss_weight_values == [1.0, 0.5]
    cfg = TrainConfig.from_dict({"loss": "sigmoid,sft", "loss_weights": "1,0.5"})
    assert cfg.loss_names == ["sigmoid", "sft"] and cfg.loss_weight_values == [1.0, 0.5]


def test_a_user_error_is_one_line_and_exit_2(capsys):
    assert main(["train", "--beta", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpokit: error: beta = -1.0 is out of range") and "Traceback" not in err


def test_eval_without_pairs_or_prompts_is_a_user_error(tiny_model_dir, capsys):
    assert main(["eval", tiny_model_dir]) == 2
    assert "dpokit: error: eval needs held-out PAIRS" in capsys.readouterr().err


def test_an_internal_value_error_is_not_disguised_as_bad_input(monkeypatch):
    """A bug (here: a ValueError from inside a command) must surface with its traceback, not as
    'dpokit: error: …' blaming the user's input."""
    def broken(args):
        raise ValueError("internal bug")
    monkeypatch.setattr(cli, "cmd_losses", broken)
    with pytest.raises(ValueError, match="internal bug"):
        main(["losses"])


def test_former_bare_value_errors_are_user_errors(tiny_model_dir, tmp_path, capsys):
    """Input mistakes that used to raise a bare ValueError: each is now one of dpokit's error types."""
    assert main(["cache-ref", "--loss", "grpo"]) == 2
    assert "dpokit: error: nothing to cache: online training" in capsys.readouterr().err
    assert main(["cache-ref", "--no-ref-cache"]) == 2
    assert "dpokit: error: nothing to cache: kto" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello there"}\n')
    assert main(["make-pairs", "--model", tiny_model_dir, "--prompts", str(prompts), "--samples", "1",
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "dpokit: error: making pairs needs at least 2 samples" in capsys.readouterr().err
    assert main(["make-pairs", "--model", tiny_model_dir, "--prompts", str(prompts), "--temperature", "-1",
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "dpokit: error: temperature must be >= 0" in capsys.readouterr().err


def test_damaged_user_files_and_bad_lists_are_user_errors(tmp_path, capsys):
    """Library ValueErrors on the user's own input (a damaged eval.json, --best-of x) are reported as the
    user's to fix, not shown as a dpokit traceback."""
    (tmp_path / "eval.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert f"dpokit: error: {tmp_path / 'eval.json'}: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "beta=0.1", "--best-of", "1,x"])
    assert exit_.value.code == 2 and "--best-of: invalid int_list value" in capsys.readouterr().err
