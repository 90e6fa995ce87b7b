"""Stage 3: the chunked hidden-state path equals the textbook full-logits path, padded equals unpadded."""

from __future__ import annotations

import torch

import dpokit.logprobs.sequence as seq
from conftest import make_tiny_model
from dpokit.batches import collate, tokenize_pair
from dpokit.data.formats import Pair
from dpokit.logprobs import pair_logps, sequence_logps, sequence_logps_full


def _pairs(tokenizer, explicit_rows):
    return [tokenize_pair(Pair(r["prompt"], r["chosen"], r["rejected"], f"x:{i}"), tokenizer, 512, None)
            for i, r in enumerate(explicit_rows)]


def test_chunked_equals_full_logits(tokenizer, explicit_rows):
    model = make_tiny_model(len(tokenizer))
    batch = collate(_pairs(tokenizer, explicit_rows), tokenizer.pad_token_id)
    with torch.no_grad():
        fast = sequence_logps(model, **batch)
        full = sequence_logps_full(model, **batch)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_padded_batch_equals_one_sequence_at_a_time(tokenizer, explicit_rows):
    model = make_tiny_model(len(tokenizer))
    pairs = _pairs(tokenizer, explicit_rows)
    with torch.no_grad():
        logps = pair_logps(model, collate(pairs, tokenizer.pad_token_id))
        chosen, rejected = logps.chosen, logps.rejected
        for i, p in enumerate(pairs):
            for ids, expected in ((p.chosen_ids, chosen[i]), (p.rejected_ids, rejected[i])):
                x = torch.tensor([p.prompt_ids + ids])
                # independent: plain log_softmax over the model's logits for this one sequence
                logits = model(input_ids=x).logits[0, :-1].float()
                lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).squeeze(-1)
                one = lp[len(p.prompt_ids) - 1:].sum()
                torch.testing.assert_close(expected, one, rtol=1e-5, atol=1e-5)


def test_chunked_head_with_recompute_gives_the_same_values_and_gradients(tokenizer, explicit_rows, monkeypatch):
    pairs = _pairs(tokenizer, explicit_rows)
    batch = collate(pairs, tokenizer.pad_token_id)
    results = []
    for chunk_elements in (seq.CHUNK_ELEMENTS, 7 * len(tokenizer)):  # one chunk vs chunks of 7 positions
        monkeypatch.setattr(seq, "CHUNK_ELEMENTS", chunk_elements)
        model = make_tiny_model(len(tokenizer)).double()  # fp64: only the summation order differs
        logps = sequence_logps(model, **batch)
        logps.sum().backward()
        results.append((logps.detach(), model.model.embed_tokens.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-12)


def test_prefix_shared_packed_layout_equals_separate_sequences(tokenizer, explicit_rows):
    """Prefix sharing + packing must give the same log-probs and gradients as padded separate rows."""
    from dpokit.batches.packing import collate_packed
    pairs = _pairs(tokenizer, explicit_rows)
    padded = collate(pairs, tokenizer.pad_token_id)
    results = []
    for batch in (padded, collate_packed(pairs, tokenizer.pad_token_id, 0),
                  collate_packed(pairs, tokenizer.pad_token_id, 400)):
        model = make_tiny_model(len(tokenizer)).double()
        out = pair_logps(model, batch, ld_alpha=0.3, with_wpo=True)
        (out.chosen.sum() - 2 * out.rejected.sum()).backward()
        results.append((out, model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert collate_packed(pairs, tokenizer.pad_token_id, 400)["input_ids"].shape[0] < len(pairs)  # really packed
    ref, ref_grad = results[0]
    for out, grad in results[1:]:
        for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens", "chosen_wpo", "rejected_wpo"):
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-10, atol=1e-10)
        # Values agree to fp64 precision; gradients to ~1e-8 of their scale (the model's rotary tables are
        # fp32 even in an fp64 model). A masking or position bug moves them by O(1).
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-6 * ref_grad.abs().max().item())


def test_packed_layout_in_fp32_matches_to_relative_1e5(tokenizer, explicit_rows):
    from dpokit.batches.packing import collate_packed
    pairs = _pairs(tokenizer, explicit_rows)
    model = make_tiny_model(len(tokenizer))
    with torch.no_grad():
        a = pair_logps(model, collate(pairs, tokenizer.pad_token_id))
        b = pair_logps(model, collate_packed(pairs, tokenizer.pad_token_id, 1024))
    torch.testing.assert_close(b.chosen, a.chosen, rtol=1e-5, atol=0)
    torch.testing.assert_close(b.rejected, a.rejected, rtol=1e-5, atol=0)
