"""Iterative DPO (--online-dpo --rounds K): K rounds of (pairs file sampled from the current policy → an offline
run on it, starting from the current policy). loop/online.py's docstring says what a round's reference is.
Each round calls the offline loop (loop/train.py) directly: no loop calls back into the dispatcher.
--save-every and --keep-last apply to each round's offline run (under round-N/); --resume auto resumes at round
granularity: completed rounds (final/ and a metrics line) are kept, the first incomplete one samples its pairs again
(the same: the same model and seed) and goes on from its own newest checkpoint."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from dpokit.config import ONLINE_OPTIONS, TrainConfig
from dpokit.evaluation.rewards import RewardError, combine
from dpokit.generation import sample
from dpokit.generation.pairs import pair_up, write_jsonl
from dpokit.loop.checkpoint import CheckpointError, check_same_run, check_writable
from dpokit.loop.online import load_online_prompts
from dpokit.loop.result import TrainResult, pick_device
from dpokit.loop.train import train_offline
from dpokit.models import load_model, load_tokenizer


def iterative_dpo(cfg: TrainConfig, log) -> TrainResult:
    """--online-dpo --rounds K: per round, pairs sampled from the current policy, then offline training on them."""
    device = pick_device(cfg.device)
    out = Path(cfg.output_dir)
    check_writable(cfg.output_dir, 0)
    done = _rounds_done(cfg, log) if cfg.resume else {}
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts = load_online_prompts(cfg, tokenizer, log)
    reward_fn = combine(cfg.reward_specs, cfg.reward_weight_values, str(device))
    defaults = TrainConfig().to_dict()
    offline = {**cfg.to_dict(), **{k: defaults[k] for k in ONLINE_OPTIONS}}
    model, steps = cfg.model, 0
    metrics_file = open(out / "metrics.jsonl", "a" if done else "w", encoding="utf-8")
    for r in range(1, cfg.rounds + 1):
        if r in done:  # a completed round: its final/ is the next round's start
            model, steps = str(out / f"round-{r}" / "final"), done[r]["step"]
            continue
        policy = load_model(model, device, cfg.allow_pickle, cfg.trust_remote_code, cfg.model_dtype)  # samples only
        samples = sample(policy, tokenizer, prompts, cfg.num_generations, cfg.max_new_tokens, cfg.temperature,
                         seed=cfg.seed * 1_000_003 + r)
        del policy
        rewards = reward_fn([samples.prompt_of(i) for i in range(len(samples.texts))], samples.texts)
        rows, stats = pair_up(samples, rewards, "best-worst")
        stats.seconds = samples.seconds
        log(f"round {r}/{cfg.rounds}: {stats.summary()}; mean reward {statistics.fmean(rewards):.4f}")
        if not rows:
            raise RewardError(f"round {r}: every sampled group tied on reward; no pairs to train on")
        pairs_file = write_jsonl(rows, out / f"round-{r}" / "pairs.jsonl")
        # --resume auto: an interrupted round goes on from its own checkpoint (its pairs, sampled again from the same
        # model with the same seed, are the same)
        result = train_offline(TrainConfig.from_dict({**offline, "model": model, "data": str(pairs_file),
                                                      "output_dir": str(out / f"round-{r}"),
                                                      "resume": "auto" if cfg.resume else None}), log=log)
        model, steps = str(result.final_dir), steps + result.steps
        metrics_file.write(json.dumps({"round": r, "step": steps, "reward": statistics.fmean(rewards),
                                       "reward_std": statistics.stdev(rewards), "pairs": stats.pairs,
                                       "ties": stats.ties, "identical": stats.identical,
                                       "completion_length": statistics.fmean(samples.lengths),
                                       "generation_s": samples.seconds}) + "\n")
        metrics_file.flush()
    metrics_file.close()
    final = out / "final"
    shutil.copytree(model, final, dirs_exist_ok=True)
    log(f"saved {final} (the last round's model); per-round runs in {out}/round-*")
    return TrainResult(out, steps, None, None, final)


def _rounds_done(cfg: TrainConfig, log) -> dict[int, dict]:
    """--resume (auto) of iterative DPO, at round granularity: the rounds with a final/ and a metrics line (their
    lines kept, later ones dropped), after refusing options other than those the run was started with."""
    out = Path(cfg.output_dir)
    if cfg.resume != "auto":
        raise CheckpointError(f"--resume {cfg.resume}: iterative DPO (--rounds) resumes with --resume auto (each "
                              "round from its own checkpoints under round-N/)")
    if not (out / "config.yaml").is_file():
        log(f"--resume auto: no iterative DPO run in {out} yet; starting fresh")
        return {}
    check_same_run(out, cfg.to_dict())  # config.yaml of the run: the same check as a checkpoint's
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()] \
        if (out / "metrics.jsonl").is_file() else []
    done = {m["round"]: m for m in lines if (out / f"round-{m['round']}" / "final" / "config.json").is_file()}
    complete = 0
    while complete + 1 in done:  # consecutive from round 1
        complete += 1
    done = {r: done[r] for r in range(1, complete + 1)}
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in done.values()), encoding="utf-8")
    log(f"--resume auto: rounds {', '.join(map(str, done)) or 'none'} complete; going on from round {len(done) + 1}")
    return done
