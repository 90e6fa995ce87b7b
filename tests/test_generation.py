"""The sampler: exact categorical draws, KV-cache decoding equal to HF generate, padding-independent rows,
and the log-probs it records equal to teacher-forced ones (they feed the KL estimate)."""

import pytest
import torch

from conftest import make_tiny_model
from dpokit.batches import pad_rows
from dpokit.generation import next_token, sample
from dpokit.generation.sample import _decode
from dpokit.logprobs import sequence_logps

PROMPTS = ["How do I boil an egg?", "Hi", "Name three rivers in Europe, please, and say which is longest."]


def _frequencies(logits, draws=60000, **kw):
    g = torch.Generator().manual_seed(0)
    tokens = next_token(logits.expand(draws, -1), generator=g, **kw)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / draws


def test_next_token_draws_from_the_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]))
    freq = _frequencies(logits, temperature=1.0, top_p=1.0)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64), atol=0.008)
    assert freq[4] == 0  # a zero-probability token is never drawn


def test_temperature_and_top_p():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    cold = _frequencies(torch.log(p)[None], temperature=0.5, top_p=1.0)
    expected = p.double() ** 2 / (p.double() ** 2).sum()  # softmax(log p / 0.5) ∝ p²
    assert torch.allclose(cold, expected, atol=0.008)
    nucleus = _frequencies(torch.log(p)[None], temperature=1.0, top_p=0.8)
    assert torch.allclose(nucleus, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64), atol=0.008)
    assert next_token(torch.tensor([[0.1, 3.0, 2.0]]), 0.0, 1.0, torch.Generator()).item() == 1  # greedy


def test_greedy_decoding_matches_hf_generate(tokenizer):
    model = make_tiny_model(len(tokenizer))
    ours = sample(model, tokenizer, PROMPTS, n=1, max_new_tokens=12, temperature=0.0)
    for prompt, ids, completion in zip(PROMPTS, ours.prompt_ids, ours.completion_ids):
        enc = torch.tensor([ids])
        ref = model.generate(enc, attention_mask=torch.ones_like(enc), do_sample=False, max_new_tokens=12,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert completion == ref[0, len(ids):].tolist()


def test_rows_do_not_depend_on_their_batch(tokenizer):
    model = make_tiny_model(len(tokenizer))
    together = sample(model, tokenizer, PROMPTS, n=2, max_new_tokens=10, temperature=0.0)
    alone = sample(model, tokenizer, PROMPTS[1:2], n=1, max_new_tokens=10, temperature=0.0)
    assert together.completion_ids[2] == together.completion_ids[3] == alone.completion_ids[0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logps_equal_teacher_forcing_and_seed_repeats(tokenizer, temperature):
    """Recorded: the model's own log-probs (T = 1) whatever the sampling temperature — generation metrics
    subtract the reference's T = 1 log-probs from them; GRPO's tempered ones: tests/test_online.py."""
    model = make_tiny_model(len(tokenizer))
    kw = dict(n=3, max_new_tokens=16, batch_size=4, temperature=temperature)
    s = sample(model, tokenizer, PROMPTS, seed=7, **kw)
    assert len(s.texts) == 9 and s.prompt_of(4) == PROMPTS[1]
    batch = pad_rows(list(zip(s.prompt_ids, s.completion_ids)), tokenizer.pad_token_id)
    with torch.no_grad():
        forced = sequence_logps(model, **batch)
    assert torch.allclose(torch.tensor(s.logps, dtype=torch.float32), forced, rtol=1e-4, atol=1e-4)
    again = sample(model, tokenizer, PROMPTS, seed=7, **kw)
    assert again.completion_ids == s.completion_ids
    other = sample(model, tokenizer, PROMPTS, seed=8, **kw)
    assert other.completion_ids != s.completion_ids


def test_a_row_stops_at_eos_and_keeps_it(tokenizer):
    model = make_tiny_model(len(tokenizer))
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    g = torch.Generator()
    free, _ = _decode(model, ids, 10, -1, tokenizer.pad_token_id, 0.0, 1.0, g, "cpu")
    stop = free[0][2]  # pretend the third greedy token of row 0 is EOS
    cut, _ = _decode(model, ids, 10, stop, tokenizer.pad_token_id, 0.0, 1.0, g, "cpu")
    for full, short in zip(free, cut):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert short == full[:end]


def test_chat_prompts_use_the_template(tokenizer):
    model = make_tiny_model(len(tokenizer))
    s = sample(model, tokenizer, [[{"role": "user", "content": "Hi"}]], n=1, max_new_tokens=3)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert s.prompt_ids[0] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_bad_sampling_options_are_refused(tokenizer):
    with pytest.raises(ValueError, match="top_p"):
        sample(make_tiny_model(len(tokenizer)), tokenizer, PROMPTS, top_p=0.0)


def test_rows_cut_by_max_new_tokens_are_marked_truncated(tokenizer):
    model = make_tiny_model(len(tokenizer))
    free = sample(model, tokenizer, PROMPTS, n=1, max_new_tokens=6, temperature=0.0)
    assert free.truncated == [True] * 3 and free.lengths == [6] * 3  # no EOS drawn: every row cut

    class StopsAt:  # the same tokenizer, with the first greedy token of row 0 as its EOS
        def __init__(self, eos):
            self.eos_token_id = eos

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *a, **k):
            return tokenizer(*a, **k)

    stop = free.completion_ids[0][0]
    cut = sample(model, StopsAt(stop), PROMPTS, n=1, max_new_tokens=6, temperature=0.0)
    assert cut.completion_ids[0] == [stop] and cut.truncated[0] is False
    assert cut.truncated == [stop not in c for c in cut.completion_ids]
