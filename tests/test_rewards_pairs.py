"""Reward functions, prompt files, pair making and the statistics of generation metrics."""

import json
import math

import pytest
import torch

from conftest import make_tiny_model, write_jsonl
from dpokit.data import DataError, load_prompts
from dpokit.evaluation.generation import best_of_n, generation_metrics, mean_ci, win_rate
from dpokit.evaluation.rewards import RewardError, combine, load_reward
from dpokit.generation import Samples
from dpokit.tasks.pairs import make_pairs, pair_up


def test_sentiment_reward_orders_reviews():
    r = load_reward("sentiment")
    good, bad, flat = r(["The film was"] * 3, [" wonderful, moving and funny.", " a dull, painful mess.", " long."])
    assert good > 0.5 and bad < -0.5 and abs(flat) < 0.1
    assert r.__name__ == "sentiment"


def test_callable_reward_and_its_checks(tmp_path, monkeypatch):
    r = load_reward("conftest:letter_reward")
    assert r(["p"], ["eee"]) == [1.0]
    with pytest.raises(RewardError, match="cannot import"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(RewardError, match="not 'sentiment', an existing model folder"):
        load_reward("positivity")
    (tmp_path / "badreward.py").write_text("def short(p, c):\n    return [1.0]\n"
                                           "def nan(p, c):\n    return [float('nan')] * len(c)\n"
                                           "def word(p, c):\n    return ['high'] * len(c)\nX = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="returned 1 values for 2"):
        load_reward("badreward:short")(["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match="value 0 is nan"):
        load_reward("badreward:nan")(["a"], ["x"])
    with pytest.raises(RewardError, match="'high', not a number"):
        load_reward("badreward:word")(["a"], ["x"])
    with pytest.raises(RewardError, match="not callable"):
        load_reward("badreward:X")


def _classifier_folder(path, tokenizer, pad_token_id, chat_template: bool):
    """A tiny random 2-label Llama reward model saved with `tokenizer` (with or without its chat template)."""
    import copy
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=pad_token_id,
                      id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer = copy.deepcopy(tokenizer)
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    return model, tokenizer


def _logits_one_by_one(model, tokenizer, texts, add_special_tokens=True):
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt", add_special_tokens=add_special_tokens)).logits[0]
                for t in texts]


def test_classifier_folder_reward(tmp_path, tokenizer):
    """Without a chat template the reward model reads prompt + completion as plain text."""
    model, tok = _classifier_folder(tmp_path, tokenizer, tokenizer.pad_token_id, chat_template=False)
    texts = ["How do I boil an egg?", "Hi"]
    expected = _logits_one_by_one(model, tok, [t + " yes" for t in texts])
    for spec, column in ((f"{tmp_path}#POSITIVE", 1), (f"{tmp_path}#NEGATIVE", 0)):
        got = load_reward(spec)(texts, [" yes", " yes"])
        assert got == pytest.approx([e[column].item() for e in expected], abs=1e-5)
    # two labels and none named: no single reward (it used to take the last label silently)
    with pytest.raises(RewardError, match=r"2 labels \(\['NEGATIVE', 'POSITIVE'\]\).*#POSITIVE"):
        load_reward(str(tmp_path))
    with pytest.raises(RewardError, match="no label 'HAPPY'"):
        load_reward(f"{tmp_path}#HAPPY")


def test_a_classifier_says_how_many_rows_it_cut_at_model_max_length(tmp_path, tokenizer):
    import warnings
    from transformers import AutoTokenizer
    from dpokit.evaluation.rewards import RewardTruncationWarning
    _classifier_folder(tmp_path, tokenizer, tokenizer.pad_token_id, chat_template=False)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.model_max_length = 6
    tok.save_pretrained(tmp_path)
    reward = load_reward(f"{tmp_path}#POSITIVE")
    with pytest.warns(RewardTruncationWarning, match=r"1 of 2 rows reached its tokenizer's model_max_length of 6 "
                                                     r"tokens and were cut on the right: their scores miss the end"):
        reward(["Hi", "How do I boil an egg? Tell me step by step."], [" yes", " Simmer it for ten minutes."])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RewardTruncationWarning)
        reward(["Hi"], [" yes"])  # nothing cut: nothing said


def test_classifier_without_pad_token_id_scores_batches(tmp_path, tokenizer):
    """A reward model whose config has no pad_token_id: HF refuses batches > 1 unless it is set (from the
    tokenizer), and each row then scores as it does alone."""
    model, tok = _classifier_folder(tmp_path, tokenizer, None, chat_template=False)
    prompts, completions = ["How do I boil an egg?", "Hi", "Name a fruit."], [" Simmer it.", " yes", " An apple."]
    expected = _logits_one_by_one(model, tok, [p + c for p, c in zip(prompts, completions)])
    got = load_reward(f"{tmp_path}#POSITIVE")(prompts, completions)
    assert got == pytest.approx([e[1].item() for e in expected], abs=1e-5)


def test_classifier_with_a_chat_template_reads_the_conversation(tmp_path, tokenizer):
    """With a chat template, (prompt, completion) is rendered as [user: prompt, assistant: completion]; a
    message-list prompt is extended by the assistant turn."""
    model, tok = _classifier_folder(tmp_path, tokenizer, tokenizer.pad_token_id, chat_template=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompts, completions = ["How do I boil an egg?", chat], ["Simmer it.", "Hello!"]
    conversations = [[{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": "Simmer it."}],
                     chat + [{"role": "assistant", "content": "Hello!"}]]
    texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations]
    assert texts[0] == ("<|im_start|>user\nHow do I boil an egg?<|im_end|>\n"
                        "<|im_start|>assistant\nSimmer it.<|im_end|>\n")
    expected = _logits_one_by_one(model, tok, texts, add_special_tokens=False)
    got = load_reward(f"{tmp_path}#POSITIVE")(prompts, completions)
    assert got == pytest.approx([e[1].item() for e in expected], abs=1e-5)


def test_combined_rewards_weight_each_term():
    both = combine(["sentiment", "conftest:letter_reward"], [2.0, -1.0])
    s = load_reward("sentiment")(["x"], [" a lovely film"])[0]
    e = load_reward("conftest:letter_reward")(["x"], [" a lovely film"])[0]
    assert both(["x"], [" a lovely film"]) == pytest.approx([2 * s - e])
    with pytest.raises(RewardError, match="2 rewards but 1 weights"):
        combine(["sentiment", "sentiment"], [1.0])


def _samples(texts, n):
    return Samples([f"p{i}" for i in range(len(texts) // n)], n, [[1]] * len(texts), [[2]] * len(texts),
                   texts, [0.0] * len(texts))


def test_pairing_best_worst_and_all():
    s = _samples(["a", "b", "c", "d", "e", "f"], 3)
    rewards = [0.1, 0.9, 0.5, 0.2, 0.2, 0.7]
    rows, stats = pair_up(s, rewards, "best-worst")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("b", "a"), ("f", "e")]  # d and e tie for worst: the later one
    assert rows[0]["chosen_reward"] == 0.9 and rows[0]["prompt"] == "p0"
    rows, stats = pair_up(s, rewards, "all")
    assert len(rows) == 5 and stats.ties == 1  # d and e tie
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    rows, stats = pair_up(_samples(["a", "a", "b", "c"], 2), [0.3, 0.1, 0.2, 0.2], "best-worst")
    assert rows == [] and stats.identical == 1 and stats.ties == 1
    assert "0 pairs from 2 prompts" in stats.summary()
    with pytest.raises(ValueError, match="pairing"):
        pair_up(s, rewards, "random")


def test_pairs_of_chat_prompts_read_back_as_conversational(tmp_path, tokenizer):
    from dpokit.data import load_pairs
    from dpokit.tasks.pairs import write_jsonl
    chat = [{"role": "user", "content": "Hi"}]
    rows, _ = make_pairs(make_tiny_model(len(tokenizer)), tokenizer, [chat], load_reward("conftest:letter_reward"),
                         n=4, max_new_tokens=8)
    pairs, report = load_pairs(str(write_jsonl(rows, tmp_path / "chat_pairs.jsonl")))
    assert report.format == "conversational" and pairs[0].chosen[0]["role"] == "assistant"


def test_make_pairs_from_a_model(tokenizer):
    model = make_tiny_model(len(tokenizer))
    rows, stats = make_pairs(model, tokenizer, ["How do I boil an egg?", "Hi"], load_reward("conftest:letter_reward"),
                             n=4, max_new_tokens=12)
    assert stats.samples == 8 and stats.pairs == len(rows) >= 1
    assert all(r["chosen"] != r["rejected"] and r["chosen_reward"] > r["rejected_reward"] for r in rows)
    with pytest.raises(ValueError, match="at least 2"):
        make_pairs(model, tokenizer, ["Hi"], load_reward("sentiment"), n=1)


def test_prompt_files(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The film"}, {"prompt": [{"role": "user", "content": "Hi"}]},
                                              {"prompt": "A", "chosen": "b", "rejected": "c"}])
    prompts, report = load_prompts(path)
    assert prompts[0] == "The film" and prompts[1][0]["role"] == "user" and len(prompts) == 3
    assert "3 prompts" in report.summary()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}, {"prompt": 3}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'prompt'"):
        load_prompts(bad)
    prompts, report = load_prompts(bad, on_bad_row="skip")
    assert prompts == ["ok"] and sum(report.skipped.values()) == 2


def test_statistics():
    mean, ci = mean_ci([1.0, 3.0, 2.0, 4.0], groups=2)  # prompt means 2 and 3
    assert mean == 2.5 and ci == pytest.approx(1.96 * math.sqrt(0.5 / 2))
    assert win_rate([1, 2, 3], [2, 2, 1]) == [0.0, 0.5, 1.0]
    s = _samples(["a"] * 8, 4)
    bon = best_of_n(s, [0.1, 0.5, 0.3, 0.2, -1, -2, 0.0, 0.4], 2)
    assert bon["reward_mean"] == pytest.approx((0.5 + -1) / 2) and bon["kl"] == pytest.approx(math.log(2) - 0.5)
    assert best_of_n(s, [0.0] * 8, 1)["kl"] == 0.0
    with pytest.raises(ValueError, match="needs at least 8"):
        best_of_n(s, [0.0] * 8, 8)


def test_generation_metrics_of_a_model_against_itself(tokenizer):
    model = make_tiny_model(len(tokenizer))
    m, (ref_samples, ref_rewards) = generation_metrics(model, model, tokenizer, ["How do I boil an egg?", "Hi", "Why?"],
                                                       load_reward("conftest:letter_reward"), k=3, max_new_tokens=10)
    assert abs(m["kl_mean"]) < 1e-3  # the same model: log π − log π_ref = 0 up to rounding
    assert 0 <= m["win_rate"] <= 1 and m["prompts"] == 3 and m["samples_per_prompt"] == 3
    assert len(m["samples"]) == 3 and {"prompt", "policy", "policy_reward", "reference", "reference_reward"} <= \
        set(m["samples"][0])
    assert m["policy"]["length_mean"] <= 10 and "kl_note" not in m
    json.dumps(m)  # eval.json-ready
    again, _ = generation_metrics(model, model, tokenizer, ["How do I boil an egg?", "Hi", "Why?"],
                                  load_reward("conftest:letter_reward"), k=3, max_new_tokens=10,
                                  reference_samples=(ref_samples, ref_rewards))
    assert again["reference"] == m["reference"] and again["win_rate"] == m["win_rate"]
    warm, _ = generation_metrics(model, model, tokenizer, ["Hi"], load_reward("conftest:letter_reward"), k=2,
                                 max_new_tokens=5, temperature=0.7)
    assert "kl_note" in warm


def test_cut_samples_are_marked_and_train_without_eos(tmp_path, tokenizer):
    """A sample stopped by max_new_tokens did not end: its row says `*_truncated: true` and its tokens get no
    EOS; a sample that ended by itself gets EOS (plain text) or the template's end of turn (chat)."""
    from dpokit.batches.tokenize import tokenize_completions, tokenize_pairs
    from dpokit.data import load_completions, load_pairs
    from dpokit.tasks.pairs import write_jsonl
    eos, chat = tokenizer.eos_token_id, [{"role": "user", "content": "Hi"}]
    # prompt "p0": row 0 ended (EOS sampled), row 1 cut at max_new_tokens
    s = Samples(["How do I boil an egg?", chat], 2, [[1]] * 4, [[40, 41, eos], [42, 43, 44], [45, eos], [46, 47]],
                [" Boil it", " Simmer it gently", " Fine", " Hello there"], [0.0] * 4,
                truncated=[False, True, False, True])
    rows, stats = pair_up(s, [1.0, 0.0, 0.0, 1.0])
    assert stats.truncated == 2 and "2 of 4 samples cut at max_new_tokens" in stats.summary()
    assert [(r["chosen_truncated"], r["rejected_truncated"]) for r in rows] == [(False, True), (True, False)]
    path = str(write_jsonl(rows[:1], tmp_path / "pairs.jsonl"))
    (text,), _ = tokenize_pairs(load_pairs(path)[0], tokenizer, 256, None)
    (conv,), _ = tokenize_pairs(load_pairs(str(write_jsonl(rows[1:], tmp_path / "chat.jsonl")))[0], tokenizer, 256,
                                None)
    assert text.chosen_ids[-1] == eos and text.rejected_ids[-1] != eos
    assert tokenizer.decode(text.rejected_ids) == " Simmer it gently"
    end_of_turn = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert conv.rejected_ids[-len(end_of_turn):] == end_of_turn  # ended: the template closes the turn
    assert tokenizer.decode(conv.chosen_ids).endswith("Hello there")  # cut: the turn stays open
    # KTO reads the same file as desirable / undesirable completions, with the same rule
    completions, _ = tokenize_completions(load_completions(path)[0], tokenizer, 256, None)
    assert [c.completion_ids[-1] == eos for c in completions[:2]] == [True, False]
    # a bad flag is a data error naming the field
    write_jsonl([{**rows[0], "chosen_truncated": "yes"}], tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="chosen_truncated"):
        load_pairs(str(tmp_path / "bad.jsonl"))
