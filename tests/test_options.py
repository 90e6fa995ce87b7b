"""Options know their group: every TrainConfig field's metadata is complete, and every key set the code
derives from it (refusals, resume, sweep, iterative DPO's resets, `--help` sections) stays true to it.
Objectives: whatever depends on which objective is selected is a registry field, callable for every kind."""

from __future__ import annotations

import math
import random
from dataclasses import fields

import pytest
import torch
import yaml

from dpokit.cli import SET_BY_COMMAND, main
from dpokit.config import BOOKKEEPING, ONLINE_OPTIONS, RESUME_MAY_CHANGE, ConfigError, TrainConfig, group_keys
from dpokit.config_checks import NEEDS
from dpokit.objectives.registry import DATA, OBJECTIVES, OnlineInputs, UnpairedInputs
from dpokit.options import (ALL_RUNS, GROUPS, ITERATIVE_DPO, OFFLINE, ON_PAIRS, ONLINE_DPO, ONLINE_OBJECTIVE,
                            REWARD_MODEL, SAMPLING, SFT, in_range)

FIELDS = {f.name: f for f in fields(TrainConfig)}
# a config of each kind of run, and the option that selects the kind
RUN_CONFIGS = {OFFLINE: {}, ONLINE_DPO: {"online_dpo": True}, ITERATIVE_DPO: {"online_dpo": True, "rounds": 2},
               ONLINE_OBJECTIVE: {"loss": "grpo"}, REWARD_MODEL: {"stage": "reward_model"}, SFT: {"stage": "sft"}}
SELECTS_THE_RUN = {"loss", "online_dpo", "rounds", "stage"}


def test_every_option_has_a_group_a_help_runs_needs_and_a_valid_range():
    for name, f in FIELDS.items():
        meta = f.metadata
        assert meta["group"] in GROUPS and meta["help"], name
        assert meta["runs"] and set(meta["runs"]) <= set(ALL_RUNS), name
        assert set(meta["needs"]) <= set(NEEDS), name
        if meta["valid"]:
            ok, allowed = in_range(meta["valid"], f.default, TrainConfig()) if f.default is not None else (True, "")
            assert ok, f"{name}: default {f.default!r} outside its own range ({allowed})"
        if meta["choices"]:
            assert f.default in meta["choices"], name
    assert [FIELDS[k].metadata["group"] for k in FIELDS] == sorted(
        (FIELDS[k].metadata["group"] for k in FIELDS), key=list(GROUPS).index), "fields are grouped in GROUPS order"


def test_every_objective_option_is_an_objective_field_read_by_the_objectives_runs():
    options = {k for o in OBJECTIVES.values() for k in o.options}
    assert options <= set(group_keys("objective"))
    for o in OBJECTIVES.values():
        assert o.data in DATA, o.name
        assert isinstance(o.reference, bool) or o.reference in FIELDS, o.name
        for key in o.options:
            expected = (ONLINE_OBJECTIVE,) if o.data == "online" else ON_PAIRS
            assert FIELDS[key].metadata["runs"] == expected, (o.name, key)
    # what the objective group holds besides the objectives' own options: loss, its weights, β and the modifiers,
    # and the reward model's (`dpokit train-rm`, not a --loss) centring weight
    assert set(group_keys("objective")) - options == {"loss", "loss_weights", "beta", "f_divergence", "f_alpha",
                                                      "use_weighting", "ld_alpha", "sync_ref_every", "sync_ref_alpha",
                                                      "center_rewards_coefficient"}


def test_derived_key_sets():
    assert BOOKKEEPING == set(group_keys("bookkeeping")) and BOOKKEEPING <= RESUME_MAY_CHANGE
    # the held-out sets (offline pairs, online prompts), as the device's name and the non-finite policy
    assert RESUME_MAY_CHANGE - BOOKKEEPING == {"device", "eval_data", "eval_prompts", "eval_max_prompts", "on_nonfinite"}
    assert "eval_batch_size" not in RESUME_MAY_CHANGE  # it changes the eval/* sums' last bits
    assert set(ONLINE_OPTIONS) == {k for k, f in FIELDS.items() if f.metadata["group"] == "online"}
    for key in ONLINE_OPTIONS:  # so resetting them leaves a config that trains offline
        assert set(FIELDS[key].metadata["runs"]) <= set(SAMPLING), key


def _other_value(key: str):
    """A value of `key` other than its default (in range or not: refusals for an unread option come first)."""
    f = FIELDS[key]
    if f.metadata["choices"]:
        return next(c for c in f.metadata["choices"] if c != f.default)
    kind = f.type.replace("| None", "").replace("| list", "").strip()
    if kind == "bool":
        return not f.default
    if kind in ("int", "float"):
        return (f.default or 0) + (3 if kind == "int" else 0.25)
    return "other"


@pytest.mark.parametrize("run", ALL_RUNS)
def test_an_option_set_in_a_run_that_does_not_read_it_is_refused_naming_it(run):
    base = RUN_CONFIGS[run]
    TrainConfig.from_dict(base)
    unread = [k for k, f in FIELDS.items() if run not in f.metadata["runs"] and k not in SELECTS_THE_RUN]
    assert unread or run == OFFLINE
    for key in unread:
        with pytest.raises(ConfigError, match=rf"\b{key}\b"):
            TrainConfig.from_dict({**base, key: _other_value(key)})


def test_an_option_without_what_it_needs_is_refused_naming_it():
    without = {"lora": {}, "reference": {"loss": "simpo"}, "paired": {"loss": "kto"}, "objective": {"loss": "hinge"},
               "alpha_divergence": {}, "moving_reference": {}, "prefix_sharing": {"prefix_sharing": False}}
    assert set(without) == set(NEEDS)
    objective_options = {k for o in OBJECTIVES.values() if o.data != "online" for k in o.options}
    for key, f in FIELDS.items():
        for need in f.metadata["needs"] + (("objective",) if key in objective_options else ()):
            with pytest.raises(ConfigError, match=rf"\b{key}\b"):
                TrainConfig.from_dict({**without[need], key: _other_value(key)})


def test_a_saved_config_lists_every_key_and_reloads():
    """requested(): given *and* not the default, so a run's config.yaml (every key) is no request for any."""
    for run, values in RUN_CONFIGS.items():
        saved = yaml.safe_load(TrainConfig.from_dict(values).to_yaml())
        cfg = TrainConfig.from_dict(saved)
        assert cfg.given == set(FIELDS) and cfg.requested() == set(values) and cfg.run_kind == run
    assert TrainConfig.from_dict({"loss": "grpo", "beta": 0.1}).requested() == {"loss"}
    assert TrainConfig(lr=1.0).requested() == {"lr"}  # built directly: every key counts as given


def test_iterative_rounds_reset_the_online_options_to_an_offline_config():
    cfg = TrainConfig.from_dict({"online_dpo": True, "rounds": 2, "reward": "sentiment", "num_generations": 3,
                                 "beta": 0.2, "ref_cache": False})
    defaults = TrainConfig().to_dict()
    offline = TrainConfig.from_dict({**cfg.to_dict(), **{k: defaults[k] for k in ONLINE_OPTIONS}})
    assert offline.run_kind == OFFLINE and (offline.beta, offline.ref_cache) == (0.2, False)


def test_resume_refuses_exactly_the_options_outside_resume_may_change(tmp_path):
    from dpokit.loop.checkpoint import CheckpointError, check_same_run
    (tmp_path / "config.yaml").write_text(TrainConfig().to_yaml(), encoding="utf-8")
    for key in FIELDS:
        changed = {**TrainConfig().to_dict(), key: _other_value(key)}
        if key in RESUME_MAY_CHANGE:
            check_same_run(tmp_path, changed)
        else:
            with pytest.raises(CheckpointError, match=key):
                check_same_run(tmp_path, changed)


def test_sweep_results_ignore_exactly_the_bookkeeping_options():
    from dpokit.tasks.sweep_runs import result_options
    assert set(result_options(TrainConfig())) == set(FIELDS) - BOOKKEEPING


def test_help_has_one_section_per_group_holding_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    starts = [text.index(f"\n{title}:\n") for title, _ in GROUPS.values()]
    assert starts == sorted(starts), "sections in GROUPS order"
    bounds = dict(zip(GROUPS, zip(starts, starts[1:] + [len(text)])))
    for key, f in FIELDS.items():
        if key in SET_BY_COMMAND:  # the stage: train or train-rm says it
            assert f"--{key}" not in text
            continue
        flag = "--" + key.replace("_", "-")
        start, end = bounds[f.metadata["group"]]
        assert f"  {flag}" in text[start:end], (key, f.metadata["group"])


def test_losses_lists_grpo_from_the_table(capsys):
    assert main(["losses"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("grpo ")]
    assert len(rows) == 1 and "online" in rows[0] and "kl_coef>0" in rows[0]


def test_kto_and_grpo_compute_through_the_registry():
    from dpokit.objectives.grpo import grpo_loss
    from dpokit.objectives.kto import kto_loss
    g = torch.Generator().manual_seed(0)
    cfg = TrainConfig(loss="kto", beta=0.3, kto_desirable_weight=1.5)
    pol, ref = -torch.rand(6, generator=g, dtype=torch.float64) * 9, -torch.rand(6, generator=g, dtype=torch.float64) * 9
    labels, z = torch.tensor([True, False] * 3), torch.tensor(0.2, dtype=torch.float64)
    got = OBJECTIVES["kto"].compute(UnpairedInputs(pol, ref, labels, z), cfg)
    assert torch.equal(got, kto_loss(pol, ref, labels, z, 0.3, 1.5, 1.0))
    cfg = TrainConfig(loss="grpo", kl_coef=0.05, epsilon_high=0.28, grpo_aggregation="grpo")
    logps, old, ref = (-torch.rand(4, 5, generator=g) for _ in range(3))
    mask, adv = (torch.rand(4, 5, generator=g) > 0.2).float(), torch.randn(4, generator=g)
    loss, stats = OBJECTIVES["grpo"].compute(OnlineInputs(logps, old, adv, mask, ref), cfg)
    want, want_stats = grpo_loss(logps, old, adv, mask, ref, 0.2, 0.28, 0.05, "grpo", cfg.max_new_tokens)
    assert torch.equal(loss, want) and stats.keys() == want_stats.keys() and math.isfinite(loss.item())


def test_objective_traits_replace_the_name_tests():
    averaged = {n for n, o in OBJECTIVES.items() if o.averaged}
    nll = {n for n, o in OBJECTIVES.items() if o.nll}
    no_f = {n for n, o in OBJECTIVES.items() if o.data == "paired" and o.reference is True and not o.f_divergence}
    assert averaged == {"simpo", "orpo"} and nll == {"sft", "cpo", "orpo"}
    assert no_f == {"aot", "aot_unpaired", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "dpop"}
    for name, o in OBJECTIVES.items():  # an objective's own check speaks only when its config is wrong
        if o.check:
            assert o.check(TrainConfig(loss=name, label_smoothing=0.1)) is None, name


def test_random_configs_are_refused_naming_a_key_they_set():
    """Any refusal names an option the config set (or loss, which selects what is read)."""
    rng = random.Random(3)
    keys = [k for k in FIELDS if k not in ("model", "output_dir", "device")]
    for _ in range(300):
        values = {k: rng.choice([FIELDS[k].default, _other_value(k)]) for k in rng.sample(keys, 3)}
        try:
            TrainConfig.from_dict(values)
        except ConfigError as e:
            assert any(k in str(e) for k in values), (values, str(e))


def test_ranges_are_checked_only_for_options_the_run_reads():
    """train-rm and sft have no prompt cap: max_prompt_length's default must not limit their --max-length."""
    assert TrainConfig.from_dict({"stage": "reward_model", "max_length": 128}).max_length == 128
    assert TrainConfig.from_dict({"stage": "sft", "max_length": 128}).max_length == 128
    with pytest.raises(ConfigError, match=r"max_prompt_length = 256 is out of range"):
        TrainConfig.from_dict({"max_length": 128})  # offline DPO reads both
