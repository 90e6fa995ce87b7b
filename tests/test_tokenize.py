"""Stage 2: completions are exactly the tokens that follow the prompt inside prompt+completion."""

from __future__ import annotations

from dpokit.batches import TokenizeReport, collate, tokenize_pair
from dpokit.data.formats import Pair


def test_boundary_merge_is_resolved_inside_the_full_tokenization(tokenizer):
    # Split a sentence inside a word ("wa" + "ter"): joined, BPE merges across the cut, so the tokenized
    # prompt alone is not a prefix of the tokenized prompt+completion.
    text = "How do I get a red wine stain out of a cotton shirt with water"
    for cut in range(len(text) - 1, 0, -1):
        prompt, chosen, rejected = text[:cut], text[cut:], text[cut:] + " please"
        alone = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + chosen + tokenizer.eos_token)["input_ids"]
        if full[:len(alone)] != alone:
            break
    else:
        raise AssertionError("fixture tokenizer should merge across some cut")
    t = tokenize_pair(Pair(prompt, chosen, rejected, "x:1"), tokenizer, 512, None)
    assert t.prompt_ids + t.chosen_ids == full
    assert t.prompt_ids + t.rejected_ids == tokenizer(prompt + rejected + tokenizer.eos_token)["input_ids"]
    assert t.prompt_ids == full[:len(t.prompt_ids)] and len(t.prompt_ids) < len(alone)


def test_clean_boundary_keeps_the_whole_prompt_and_ends_with_eos(tokenizer):
    prompt = "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    t = tokenize_pair(Pair(prompt, " Simmer it for nine minutes.", " No idea.", "x:1"), tokenizer, 512, None)
    assert t.prompt_ids == tokenizer(prompt)["input_ids"]
    assert t.chosen_ids[-1] == t.rejected_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(t.chosen_ids[:-1]) == " Simmer it for nine minutes."
    # an EOS already present is not doubled
    t2 = tokenize_pair(Pair(prompt, " Yes." + tokenizer.eos_token, " No.", "x:1"), tokenizer, 512, None)
    assert t2.chosen_ids.count(tokenizer.eos_token_id) == 1


def test_conversational_uses_the_chat_template(tokenizer):
    user = [{"role": "user", "content": "Name a fruit."}]
    pair = Pair(user, [{"role": "assistant", "content": "Apple."}], [{"role": "assistant", "content": "No."}],
                "x:1", conversational=True)
    t = tokenize_pair(pair, tokenizer, 512, None)
    rendered_prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(t.prompt_ids) == rendered_prompt
    assert tokenizer.decode(t.chosen_ids) == "Apple.<|im_end|>\n"


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_completions(tokenizer):
    prompt = "\n\nHuman: " + "one two three four five six seven eight nine ten " * 4 + "\n\nAssistant:"
    chosen = " " + "alpha beta gamma delta " * 10
    full = tokenize_pair(Pair(prompt, chosen, " short.", "x:1"), tokenizer, 10_000, None)
    report = TokenizeReport()
    t = tokenize_pair(Pair(prompt, chosen, " short.", "x:1"), tokenizer, 40, 16, report)
    assert t.prompt_ids == full.prompt_ids[-16:]
    assert t.chosen_ids == full.chosen_ids[:40 - 16]
    assert t.rejected_ids == full.rejected_ids
    assert report.prompts_truncated == 1 and report.completions_truncated == 1


def test_pair_whose_completion_would_vanish_is_reported_not_trained(tokenizer):
    report = TokenizeReport()
    prompt = "\n\nHuman: " + "word " * 50 + "\n\nAssistant:"
    assert tokenize_pair(Pair(prompt, " a", " b", "f.jsonl:7"), tokenizer, 20, None, report) is None
    assert report.dropped == {"prompt_fills_max_length": 1} and report.dropped_sources == ["f.jsonl:7"]
    assert "f.jsonl:7" in report.summary()


def test_collate_pads_right_and_marks_only_completions(tokenizer):
    a = tokenize_pair(Pair("Q: one?", " yes", " no way", "x:1"), tokenizer, 512, None)
    b = tokenize_pair(Pair("Q: a longer question here?", " sure", " nah", "x:2"), tokenizer, 512, None)
    batch = collate([a, b], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    rows = [a.prompt_ids + a.chosen_ids, b.prompt_ids + b.chosen_ids, a.prompt_ids + a.rejected_ids,
            b.prompt_ids + b.rejected_ids]
    for i, (row, (p, c)) in enumerate(zip(rows, [(a, a.chosen_ids), (b, b.chosen_ids), (a, a.rejected_ids),
                                                  (b, b.rejected_ids)])):
        n = len(row)
        assert batch["input_ids"][i, :n].tolist() == row
        assert batch["attention_mask"][i].sum() == n
        assert batch["completion_mask"][i].tolist() == [0] * len(p.prompt_ids) + [1] * len(c) + [0] * (
            batch["input_ids"].shape[1] - n)


def _cut_pair(prompt, content, source="cut.jsonl:3"):
    """A conversational pair whose chosen reply was cut at --max-new-tokens (make-pairs' *_truncated)."""
    return Pair(prompt, [{"role": "assistant", "content": content}], [{"role": "assistant", "content": "Fine."}],
                source, conversational=True, chosen_ends=False)


def test_cut_chat_reply_is_the_sampled_prompt_then_its_text(tokenizer):
    """A cut reply is tokenized as the sampler saw it: chat(prompt, add_generation_prompt) + text, nothing
    after. Contents that occur inside the end-of-turn tag ("end" in <|im_end|>, "\\n") used to cut the
    rendered chat at the wrong place."""
    from dpokit.generation.sample import prompt_token_ids
    user = [{"role": "user", "content": "Say something."}]
    sampled = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    for content in ("end", "\n", "im_end", " two spaces  ", "Hello there"):
        t = tokenize_pair(_cut_pair(user, content), tokenizer, 512, None)
        assert t.prompt_ids == prompt_token_ids(user, tokenizer)  # the prompt ids the sampler fed the model
        assert tokenizer.decode(t.prompt_ids + t.chosen_ids) == sampled + content, content
        assert tokenizer.decode(t.rejected_ids) == "Fine.<|im_end|>\n"  # an ended reply still closes its turn


LLAMA3_TRIM = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
               " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def test_cut_reply_under_a_template_that_trims_content(tokenizer):
    """Llama-3's template trims every content: a cut reply with leading/trailing whitespace used to raise a
    bare ValueError (its content is not in the rendered chat); it is the sampled prompt + its text."""
    import copy
    llama = copy.deepcopy(tokenizer)
    llama.chat_template = LLAMA3_TRIM
    user = [{"role": "user", "content": "  Name a fruit. "}]
    sampled = llama.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    t = tokenize_pair(_cut_pair(user, " Apple, or maybe  "), llama, 512, None)
    assert llama.decode(t.prompt_ids + t.chosen_ids) == sampled + " Apple, or maybe  "
    assert llama.decode(t.rejected_ids).endswith("Fine.<|eot_id|>")


def test_what_a_cut_chat_reply_cannot_be_is_a_data_error_naming_the_row(tokenizer):
    """A cut completion must end with the assistant's message (the one the sampler was writing); a template
    that refuses the conversation is a DataError at the row too, not a traceback."""
    import copy

    import pytest

    from dpokit.data import DataError
    user = [{"role": "user", "content": "Hi"}]
    pair = Pair(user, [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "and?"}],
                [{"role": "assistant", "content": "Fine."}], "cut.jsonl:7", conversational=True, chosen_ends=False)
    with pytest.raises(DataError, match=r"cut\.jsonl:7: field 'chosen'.*assistant"):
        tokenize_pair(pair, tokenizer, 512, None)
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(DataError, match=r"cut\.jsonl:3:.*no system role"):
        tokenize_pair(_cut_pair(system, "Hel"), strict, 512, None)
