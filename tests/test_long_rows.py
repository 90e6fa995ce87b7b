"""Long rows (issue 14, part 2): the long-pair generator, the reference pass batched by a token budget
(no padding of long rows to each other, same sums as pair by pair), and `dpokit bench --prompt-tokens`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model, write_jsonl
from dpokit import bench, train
from dpokit.batches import TOKENS_PER_PAIR, batch_tokens, eval_batches, tokenize_pairs
from dpokit.data import builtin_path, load_pairs
from dpokit.data.long_pairs import long_pairs
from dpokit.logprobs import pairs_logps

BUILTIN = builtin_path("helpful_train")


def _quiet(*_args, **_kwargs):
    pass


def _mixed(tmp_path, tokenizer, lengths) -> str:
    """A text-pair file whose prompts have the given token lengths, in that order."""
    rows = [r for n in lengths for r in long_pairs(BUILTIN, tokenizer, n, 1)]
    return write_jsonl(tmp_path / "mixed.jsonl", rows)


@pytest.mark.parametrize("target", [300, 2000])
def test_long_pairs_reach_the_length_and_end_in_a_real_pair(tokenizer, target):
    source, _ = load_pairs(BUILTIN)
    rows = long_pairs(BUILTIN, tokenizer, target, 3)
    pairs, _ = load_pairs(write_jsonl_tmp(rows))
    tokenized, _ = tokenize_pairs(pairs, tokenizer, 10**6, None)
    for row, pair, tok, src in zip(rows, pairs, tokenized, source):
        assert not pair.conversational and set(row) == {"prompt", "chosen", "rejected"}
        assert target - 6 <= len(tok.prompt_ids) <= target + 1  # BPE may merge a token at a turn boundary
        assert row["prompt"].endswith(src.prompt) and row["prompt"].count("\n\nHuman:") > 1
        assert (row["chosen"], row["rejected"]) == (src.chosen, src.rejected)


def write_jsonl_tmp(rows) -> str:
    import tempfile
    from pathlib import Path
    return write_jsonl(Path(tempfile.mkdtemp()) / "rows.jsonl", rows)


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_reference_pass_keeps_to_the_token_budget_and_equals_pair_by_pair(tmp_path, tokenizer, prefix_sharing):
    """Before: 4 pairs a batch whatever their length, so the short ones were padded to a 2,500-token row."""
    pairs, _ = tokenize_pairs(load_pairs(_mixed(tmp_path, tokenizer, [40, 2500, 60, 80, 3000, 50, 30]))[0],
                              tokenizer, 10**6, None)
    model = make_tiny_model(len(tokenizer))
    shapes = []
    batch_size = 4
    # head probe first
    pairs_logps(model, pairs[:1], 1, 0, torch.device("cpu"), prefix_sharing=prefix_sharing, pack_tokens=1024)
    model.get_decoder().register_forward_pre_hook(  # the decoder runs every token of a batch, padding included
        lambda _m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    logps = pairs_logps(model, pairs, batch_size, 0, torch.device("cpu"), prefix_sharing=prefix_sharing,
                        pack_tokens=1024)
    rows_per_pair = 1 if prefix_sharing else 2
    assert len(shapes) >= 4
    for rows, width in shapes:  # every forward within the budget, or one pair alone
        assert rows * width <= batch_size * TOKENS_PER_PAIR or rows == rows_per_pair, (rows, width)
    computed = sum(r * w for r, w in shapes)
    real = sum(len(p.prompt_ids) * (1 if prefix_sharing else 2) + len(p.chosen_ids) + len(p.rejected_ids)
               for p in pairs)
    assert computed <= real + 2 * batch_size * TOKENS_PER_PAIR
    alone = pairs_logps(model, pairs, 1, 0, torch.device("cpu"), prefix_sharing=prefix_sharing, pack_tokens=1024)
    for name in ("chosen", "rejected"):
        torch.testing.assert_close(getattr(logps, name), getattr(alone, name), rtol=1e-6, atol=0)


def test_default_lengths_keep_plain_pair_count_batches(tokenizer):
    """max_length 512 and pack_tokens 1024 never reach the budget: batches (and cached sums) as before."""
    pairs, _ = tokenize_pairs(load_pairs(BUILTIN)[0], tokenizer, 512, None)
    for prefix_sharing in (True, False):
        ranges = eval_batches(pairs, 8, prefix_sharing, 1024)
        assert ranges == [(s, min(s + 8, len(pairs))) for s in range(0, len(pairs), 8)]
        assert all(batch_tokens(pairs[s:e], prefix_sharing, 1024) <= 8 * TOKENS_PER_PAIR for s, e in ranges)


def test_held_out_margins_stay_exactly_zero_with_long_and_short_rows(tmp_path, tiny_model_dir, tokenizer,
                                                                      monkeypatch):
    """The evaluation cuts its batches as the reference cache does, so the sums are the same floats."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    data = _mixed(tmp_path, tokenizer, [30, 1500, 40, 50, 1800, 20])
    result = train(model=tiny_model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"), max_steps=1,
                   lr=0.0, max_length=4096, batch_size=2, eval_batch_size=3, progress=False, log=_quiet)
    assert result.eval_before["eval/rewards/margins"] == 0.0
    assert result.eval_before["eval/rewards/accuracies"] == 0.0


def test_memory_fit_and_trl_skip():
    from dpokit.bench_long import fit_memory, trl_skip
    points = [(t, 1.5 + 0.2 * t / 1000 + 0.05 * (t / 1000) ** 2) for t in (500, 1500, 3000, 6000)]
    a, b, c = fit_memory(points)
    assert (a, b, c) == pytest.approx((1.5, 0.2, 0.05), abs=1e-6)
    assert fit_memory(points[:2])[2] is None  # two lengths: linear only
    assert "over --trl-max-tokens 2048" in trl_skip(4096, 4300, [], 2048)
    assert "predicted" in trl_skip(2048, 2300, [(500, 5.0), (1300, 200.0)], 4096)
    assert trl_skip(1024, 1300, [(300, 2.0), (600, 2.1)], 2048) == ""


def test_bench_prompt_tokens_prints_the_table_and_fit(tmp_path, tiny_model_dir, bench_in_process, capsys):
    out = tmp_path / "long.json"
    bench.main(["--prompt-tokens", "48,96,160", "--steps", "1", "--tools", "dpokit-dense,dpokit-segments",
                "--model", tiny_model_dir, "--data", BUILTIN, "--json", str(out)])
    text = capsys.readouterr().out
    assert "reproduce: dpokit bench --prompt-tokens 48,96,160 --steps 1" in text
    assert text.count(" c ") == 2 and "T² term at" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["prompt"], r["tool"]) for r in rows] == [(n, t) for n in (48, 96, 160)
                                                         for t in ("dpokit-dense", "dpokit-segments")]
    for dense, segments in zip(rows[::2], rows[1::2]):  # same pairs, same log-probs whichever attention
        assert dense["result"]["ref_s"] is not None  # the reference pass was computed and timed
        assert segments["result"]["first"]["logps/chosen"] == pytest.approx(dense["result"]["first"]["logps/chosen"],
                                                                            rel=1e-5)


def test_bench_prompt_tokens_refuses_max_length_and_unknown_tools(tiny_model_dir):
    with pytest.raises(SystemExit, match="--max-length does not apply"):
        bench.main(["--prompt-tokens", "256", "--max-length", "512", "--model", tiny_model_dir])
    with pytest.raises(SystemExit, match="--tools dpokit-fast: unknown"):
        bench.main(["--prompt-tokens", "256", "--tools", "dpokit-fast", "--model", tiny_model_dir])
    with pytest.raises(SystemExit, match="comma list of integers"):
        bench.main(["--prompt-tokens", "1k", "--model", tiny_model_dir])
