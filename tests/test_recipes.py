"""recipes/*.yaml, the published setups: each one's options validate as written, and each trains two steps with
the tiny model on a local stand-in for its dataset in that dataset's own row format. The test replaces only the
keys in OVERRIDDEN (what the tiny model, the CPU and two steps cannot take as published) and checks that every
other key reached the run as the recipe wrote it, so a recipe cannot rot silently."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from dpokit import train
from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))

# The only keys the two-step runs replace, and why. Anything else a recipe sets runs as written.
OVERRIDDEN = {
    "model": "the tiny random Llama (tests/conftest.py), not the hub model",
    "data": "a local stand-in in the hub dataset's row format (STAND_INS)",
    "eval_data": "the same stand-in",
    "output_dir": "the test's temporary folder",
    "max_steps": "2 steps instead of the recipe's epochs",
    "batch_size": "4 rows per micro-batch on a CPU",
    "grad_accum": "1: two optimizer steps over 8 rows",
    "max_length": "128 tokens (the tiny model's rows are short)",
    "max_prompt_length": "64 tokens, below max_length (a recipe's null stays null)",
    "fsdp": "off: FSDP needs torchrun with at least 2 processes",
    "progress": "off: no progress bar in the test log",
}


def _conversation(i: int, reply: str) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: how do I sort a list?"},
            {"role": "assistant", "content": reply}]


def ultrafeedback_binarized(n: int) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized's rows: a string prompt beside full chosen/rejected conversations
    (argilla's cleaned UltraFeedback and Tülu 3's mixtures have the same three fields)."""
    return [{"prompt": f"Question {i}: how do I sort a list?", "prompt_id": f"{i:064x}",
             "chosen": _conversation(i, "Use sorted(xs), or xs.sort() to sort in place."),
             "rejected": _conversation(i, "Lists cannot be sorted."),
             "messages": _conversation(i, "Use sorted(xs), or xs.sort() to sort in place."),
             "score_chosen": 8.0, "score_rejected": 3.0} for i in range(n)]


def argilla_cleaned(n: int) -> list[dict]:
    return [{"source": "evol_instruct", "prompt": r["prompt"], "chosen": r["chosen"], "chosen-rating": 5.0,
             "chosen-model": "gpt-4", "rejected": r["rejected"], "rejected-rating": 2.0, "rejected-model": "llama-2"}
            for r in ultrafeedback_binarized(n)]


def tulu3_mixture(n: int) -> list[dict]:
    return [{"id": f"tulu-{i}", "source": "ultrafeedback", "prompt": r["prompt"], "chosen": r["chosen"],
             "rejected": r["rejected"]} for i, r in enumerate(ultrafeedback_binarized(n))]


def kto_mix(n: int) -> list[dict]:
    """trl-lib/kto-mix-14k's rows: unpaired, prompt and completion as message lists, a boolean label."""
    return [{"prompt": [{"role": "user", "content": f"Question {i}: how do I sort a list?"}],
             "completion": [{"role": "assistant", "content": "Use sorted(xs)." if i % 2 == 0 else "You cannot."}],
             "label": i % 2 == 0} for i in range(n)]


# A recipe's dataset (hub name without the split) → rows in that dataset's format. A recipe on a new dataset
# fails here until its format has a stand-in.
STAND_INS = {
    "HuggingFaceH4/ultrafeedback_binarized": ultrafeedback_binarized,
    "argilla/ultrafeedback-binarized-preferences-cleaned": argilla_cleaned,
    "allenai/llama-3.1-tulu-3-8b-preference-mixture": tulu3_mixture,
    "trl-lib/kto-mix-14k": kto_mix,
}
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+(:\w+)?$")


def _recipe(path: Path) -> dict:
    return {k.replace("-", "_"): v for k, v in yaml.safe_load(path.read_text(encoding="utf-8")).items()}


def test_there_are_recipes_for_the_published_runs():
    names = {p.stem for p in RECIPES}
    assert {"zephyr-7b-beta-dpo", "tulu3-8b-dpo", "smollm2-1.7b-dpo", "mistral-orpo-beta",
            "kto-qwen1.5-1.8b"} <= names
    losses = {_recipe(p)["loss"] for p in RECIPES}
    assert {"sigmoid", "sigmoid_norm", "orpo", "kto"} <= losses


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_and_options(path):
    text = path.read_text(encoding="utf-8")
    header = text[:text.index("\nmodel:")]
    assert all(line.startswith("#") for line in header.splitlines()), "the header comes before any option"
    for label in ("Source:", "Hardware:", "Data:", "No dpokit equivalent"):
        assert label in header, f"{path.name}: the header lacks {label!r}"
    cfg = TrainConfig.from_yaml(str(path))  # every key known, typed and in range, and the combination allowed
    recipe = _recipe(path)
    for key in ("model", "data"):  # hub names: nothing is downloaded here, and no local file is implied
        assert HUB_NAME.match(recipe[key]) and not Path(recipe[key]).exists(), f"{path.name}: {key}"
    assert recipe["data"].split(":")[0] in STAND_INS, f"{path.name}: add a stand-in for {recipe['data']}"
    assert {k: getattr(cfg, k) for k in recipe} == recipe


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_two_steps_on_a_stand_in(path, tmp_path, tiny_model_dir):
    recipe = _recipe(path)
    data = write_jsonl(tmp_path / "stand_in.jsonl", STAND_INS[recipe["data"].split(":")[0]](8))
    overrides = {"model": tiny_model_dir, "data": data, "output_dir": str(tmp_path / "run"), "max_steps": 2,
                 "batch_size": 4, "grad_accum": 1, "max_length": 128, "fsdp": False, "progress": False,
                 "max_prompt_length": None if recipe.get("max_prompt_length", 1) is None else 64}
    if "eval_data" in recipe:
        overrides["eval_data"] = data
    assert set(overrides) <= set(OVERRIDDEN)
    cfg = TrainConfig.from_yaml(str(path), overrides=overrides)
    result = train(cfg, log=lambda *_: None)

    saved = yaml.safe_load((result.output_dir / "config.yaml").read_text(encoding="utf-8"))
    kept = {k: v for k, v in recipe.items() if k not in overrides}
    assert {k: saved[k] for k in kept} == kept  # what the run saved is what the recipe says
    records = [json.loads(line) for line in open(result.output_dir / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps][-2:] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert (result.output_dir / "final").is_dir()


def test_an_unknown_recipe_key_is_refused_naming_key_and_file(tmp_path, capsys):
    bad = tmp_path / "recipes" / "zephyr-typo.yaml"
    bad.parent.mkdir()
    bad.write_text(RECIPES[0].read_text(encoding="utf-8") + "warmup_ratio: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))}: unknown key\(s\) warmup_ratio"):
        TrainConfig.from_yaml(str(bad))
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"dpokit: error: {bad}: unknown key(s) warmup_ratio" in err and "Traceback" not in err


def test_a_string_prompt_beside_conversations_is_their_user_turn(tmp_path):
    from dpokit.data import load_pairs
    full = ultrafeedback_binarized(1)[0]  # the lists hold the user turn: read them, not the string again
    only = {"prompt": "Why?", "chosen": [{"role": "assistant", "content": "Because."}],
            "rejected": [{"role": "assistant", "content": "No."}]}  # assistant-only lists: the string is the turn
    pairs, report = load_pairs(write_jsonl(tmp_path / "p.jsonl", [full, only]))
    assert report.format == "conversational"
    assert [p.prompt for p in pairs] == [full["chosen"][:1], [{"role": "user", "content": "Why?"}]]
    assert pairs[0].chosen == full["chosen"][1:] and pairs[1].rejected == only["rejected"]
