"""Each completion computed once: pairs that share a prompt and a completion (the pairs of a ranked row with k
completions) give every paired objective the same per-pair losses and gradients as the pairs written out."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import make_tiny_model
from dpokit.batches import TokenizedPair, pair_batch
from dpokit.batches.packing import layout_tokens
from dpokit.config import TrainConfig
from dpokit.logprobs import PairLogps, pair_logps
from dpokit.objectives import OBJECTIVES, combined_loss

FIELDS = ("chosen", "rejected", "chosen_tokens", "rejected_tokens", "chosen_wpo", "rejected_wpo", "chosen_plain")
LAYOUTS = {"padded": (False, 0), "shared": (True, 0), "packed": (True, 256)}
EXTRA = {"exo_pair": {"label_smoothing": 1e-3}}


def ranked_pairs(tokenizer) -> list[TokenizedPair]:
    """Two ranked rows (k = 4 and k = 3, all pairs by score) and one plain pair, as tokenized pairs."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [("Human: name a colour. Assistant:", [" red", " a deep blue like the sea", " green", " I won't"]),
            ("Human: what is two plus two? Assistant:", [" four", " it is four, of course", " five"])]
    pairs = []
    for r, (prompt, completions) in enumerate(rows):
        for i, j in itertools.combinations(range(len(completions)), 2):  # scores fall with the index
            pairs.append(TokenizedPair(ids(prompt), ids(completions[i]), ids(completions[j]), f"f:{r}", group=f"f:{r}"))
    pairs.append(TokenizedPair(ids("Human: hi. Assistant:"), ids(" hello there"), ids(" go away"), "f:3"))
    return pairs


def written_out(model, pairs, layout, **kw) -> PairLogps:
    """Every pair alone in its own batch: nothing shared beyond its own prompt."""
    parts = [pair_logps(model, pair_batch([p], 0, *LAYOUTS[layout]), **kw) for p in pairs]
    return PairLogps(*(None if getattr(parts[0], n) is None else torch.cat([getattr(p, n) for p in parts])
                       for n in FIELDS))


def test_shared_batch_computes_each_completion_once(tokenizer):
    pairs = ranked_pairs(tokenizer)
    batch = pair_batch(pairs, 0, True, 0)
    distinct = 4 + 3 + 2
    assert batch["segments"].shape[0] == distinct and "seq_map" in batch
    prompts = {tuple(p.prompt_ids) for p in pairs}
    completions = {(tuple(p.prompt_ids), tuple(c)) for p in pairs for c in (p.chosen_ids, p.rejected_ids)}
    assert layout_tokens(pairs) == sum(len(p) for p in prompts) + sum(len(c) for _, c in completions)
    assert layout_tokens(pairs) < sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / 2
    padded = pair_batch(pairs, 0, False, 0)
    assert padded["input_ids"].shape[0] == distinct and padded["seq_map"].shape[0] == 2 * len(pairs)
    plain = [p for p in pairs if p.group is None] * 1
    assert "seq_map" not in pair_batch(plain, 0, True, 0) and "seq_map" not in pair_batch(plain, 0, False, 0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("options", [{}, {"ld_alpha": 0.5}, {"with_wpo": True}])
def test_shared_sums_equal_written_out(tokenizer, layout, options):
    model = make_tiny_model(len(tokenizer))
    pairs = ranked_pairs(tokenizer)
    with torch.no_grad():
        shared = pair_logps(model, pair_batch(pairs, 0, *LAYOUTS[layout]), **options)
        alone = written_out(model, pairs, layout, **options)
    for name in FIELDS:
        a, b = getattr(shared, name), getattr(alone, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _grads(model, pairs, layout, cfg, reference, shared: bool):
    model.zero_grad()
    kw = {"ld_alpha": cfg.ld_alpha, "with_wpo": cfg.use_weighting}
    if shared:
        pol = pair_logps(model, pair_batch(pairs, 0, *LAYOUTS[layout]), **kw)
    else:
        pol = written_out(model, pairs, layout, **kw)
    with torch.no_grad():
        ref = written_out(reference, pairs, layout, ld_alpha=cfg.ld_alpha)
    losses, _ = combined_loss(cfg.loss_names, cfg.loss_weight_values, pol, ref, cfg)
    losses.sum().backward()
    return losses.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", [n for n, o in OBJECTIVES.items() if o.data == "paired"])
def test_every_paired_objective_same_losses_and_gradients(tokenizer, name):
    """The pairs in one micro-batch vs each pair written out (the objective still sees the whole batch: some,
    like BCO's running reward mean, use batch statistics)."""
    pairs = ranked_pairs(tokenizer)
    reference = make_tiny_model(len(tokenizer), seed=1)
    cfg = TrainConfig.from_dict({"loss": name, "beta": 0.5, **EXTRA.get(name, {})})
    for layout in ("padded", "packed"):
        model = make_tiny_model(len(tokenizer)).train()
        l_shared, g_shared = _grads(model, pairs, layout, cfg, reference, shared=True)
        l_alone, g_alone = _grads(model, pairs, layout, cfg, reference, shared=False)
        torch.testing.assert_close(l_shared, l_alone, rtol=1e-5, atol=1e-6)
        assert g_alone.norm() > 0
        assert (g_shared - g_alone).norm() <= 1e-5 * g_alone.norm()


def test_ranked_rows_stay_together_in_the_epoch_order(tokenizer):
    from dpokit.batches.inputs import epoch_order, pair_groups, rank_share, sharing_summary
    pairs = ranked_pairs(tokenizer)  # groups: 6 pairs, 3 pairs, 1 plain pair
    assert pair_groups([TokenizedPair([1], [2], [3], "a"), TokenizedPair([1], [2], [4], "b")]) is None
    groups = pair_groups(pairs)
    assert groups == [list(range(6)), [6, 7, 8], [9]]
    n = len(pairs)
    assert epoch_order(n, None, 3, True) == torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    orders = {tuple(epoch_order(n, groups, seed, True)) for seed in range(12)}
    assert len(orders) > 1
    for order in orders:  # every order is a permutation with each group contiguous and in file order
        assert sorted(order) == list(range(n))
        for g in groups:
            start = order.index(g[0])
            assert list(order[start:start + len(g)]) == g
    assert epoch_order(n, groups, 0, False) == list(range(n))
    assert rank_share(list(range(10)), 1, 2, grouped=False) == [1, 3, 5, 7, 9]
    assert [rank_share(list(range(5)), r, 2, grouped=True) for r in range(2)] == [[0, 1], [2, 3, 4]]
    summary = sharing_summary(pairs, [[list(range(n))]])
    assert f"{layout_tokens(pairs):,} tokens" in summary


def test_a_ranked_row_has_one_prompt_boundary(tokenizer):
    """BPE merges "Th" + "e" across the prompt boundary in some completions and not others: pair by pair, the
    same completion would get different ids in different pairs (and the prompt two lengths); a ranked row is
    cut once, where its shortest boundary lies, so each completion is one sequence."""
    from dpokit.batches import tokenize_pair, tokenize_pairs
    from dpokit.data import Pair
    prompt, completions = "Human: say something. Assistant: Th", ["e end", "is is it", "anks", "ere"]
    pairs = [Pair(prompt, completions[i], completions[j], "f:1", group="f:1")
             for i, j in itertools.combinations(range(4), 2)]
    alone = {len(tokenize_pair(p, tokenizer, 999, None).prompt_ids) for p in pairs}
    assert len(alone) > 1  # the case is real: pair by pair the boundary moves
    tokenized, _ = tokenize_pairs(pairs, tokenizer, 999, None)
    assert len({tuple(t.prompt_ids) for t in tokenized}) == 1
    ids = {}
    for p, t in zip(pairs, tokenized):
        for text, got in ((p.chosen, t.chosen_ids), (p.rejected, t.rejected_ids)):
            assert ids.setdefault(text, got) == got
    batch = pair_batch(tokenized, 0, True, 0)
    assert batch["segments"].shape[0] == 4  # one prompt, four completions, each once


def test_an_empty_prompt_numbers_scored_tokens_alike_in_both_layouts(tokenizer):
    """With no prompt token the first completion token has nothing to be predicted from; both layouts leave it
    unscored and number the rest from 0, so LD-DPO's length weights agree."""
    ids = tokenizer(" a deep blue like the sea", add_special_tokens=False)["input_ids"]
    pairs = [TokenizedPair([], ids, ids[:3], "f:1"), TokenizedPair(ids[:2], ids[2:], ids[:1], "f:2")]
    model = make_tiny_model(len(tokenizer))
    with torch.no_grad():
        padded = pair_logps(model, pair_batch(pairs, 0, False, 0), ld_alpha=0.3)
        packed = pair_logps(model, pair_batch(pairs, 0, True, 0), ld_alpha=0.3)
    torch.testing.assert_close(packed.chosen, padded.chosen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.rejected, padded.rejected, rtol=1e-5, atol=1e-6)
