"""Iterative DPO (--online-dpo --rounds K): K rounds of (pairs file sampled from the current policy → an offline
run on it, starting from the current policy). loop/online.py's docstring says what a round's reference is.
Each round calls the offline loop (loop/train.py) directly: no loop calls back into the dispatcher.
--save-every and --keep-last apply to each round's offline run (under round-N/); --resume auto resumes at round
granularity: completed rounds (final/ and a metrics line) are kept, the first incomplete one samples its pairs again
(the same: the same model and seed) and goes on from its own newest checkpoint.

Under torchrun each rank samples and scores prompts[rank::world] from its own stream (online_dist.sampling_seed of
the round; rank 0's is the one-process seed) and rank 0 writes the round's pairs file from every rank's samples,
in the prompts' order; the round's offline run is then a DDP run (loop/train.py). Sampling is the slow part of a
round, so it is shared out rather than left to rank 0 while the others wait; the draws differ from one process's
(other prompts come from other streams), and with sampling replaced by fixed completions the pairs file and the
weights are one process's. Rank 0 alone logs, writes metrics.jsonl and final/; every rank reads the same finished
rounds on --resume auto."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from dpokit.config import ONLINE_OPTIONS, TrainConfig
from dpokit.distributed import DistributedError, start
from dpokit.evaluation.rewards import RewardError, combine
from dpokit.generation.pairs import pair_up, write_jsonl
from dpokit.loop.checkpoint import CheckpointError, check_same_run, check_writable
from dpokit.loop.online import load_online_prompts
from dpokit.loop.online_dist import Shard, deal_back, draw, placement
from dpokit.loop.result import TrainResult
from dpokit.loop.train import train_offline
from dpokit.models import load_model, load_tokenizer


def iterative_dpo(cfg: TrainConfig, log, sampler=draw) -> TrainResult:
    """--online-dpo --rounds K: per round, pairs sampled from the current policy, then offline training on them.
    `sampler`: train_online's (policy, tokenizer, this rank's prompts, cfg, round, rank) → Samples (tests inject
    fixed completions here); under torchrun this process samples its share (module docstring)."""
    shard = Shard(start(False, cfg.device))
    try:
        return _iterative(cfg, log if shard.is_main else (lambda *a, **k: None), sampler, shard)
    finally:
        shard.close()


def _iterative(cfg: TrainConfig, log, sampler, shard: Shard) -> TrainResult:
    device = shard.ctx.device(cfg.device)
    out = Path(cfg.output_dir)
    if shard.is_main:
        check_writable(cfg.output_dir, 0)
    done = _rounds_done(cfg, log) if cfg.resume else {}  # every rank reads the same finished rounds …
    shard.ctx.barrier()  # … before rank 0 rewrites config.yaml and metrics.jsonl
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    prompts = load_online_prompts(cfg, tokenizer, log)
    if len(prompts) < shard.world:
        raise DistributedError(f"{len(prompts)} prompts for {shard.world} processes: each process samples its share "
                               "of a round's prompts; give at least one prompt per process")
    reward_fn = combine(cfg.reward_specs, cfg.reward_weight_values, str(device))
    defaults = TrainConfig().to_dict()
    offline = {**cfg.to_dict(), **{k: defaults[k] for k in ONLINE_OPTIONS}}
    model, steps = cfg.model, 0
    metrics_file = None
    if shard.is_main:
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        metrics_file = open(out / "metrics.jsonl", "w", encoding="utf-8")  # the finished rounds' lines, then new ones
        metrics_file.write("".join(json.dumps(m) + "\n" for m in done.values()))
    for r in range(1, cfg.rounds + 1):
        if r in done:  # a completed round: its final/ is the next round's start
            model, steps = str(out / f"round-{r}" / "final"), done[r]["step"]
            continue
        policy = load_model(model, device, cfg.allow_pickle, cfg.trust_remote_code, cfg.model_dtype)  # samples only
        mine = sampler(policy, tokenizer, prompts[shard.rank::shard.world], cfg, r, shard.rank)
        del policy
        scores = reward_fn([mine.prompt_of(i) for i in range(len(mine.texts))], mine.texts)
        samples, rewards = deal_back(shard.gather_all((mine, list(scores))) if shard.world > 1 else [(mine, scores)],
                                     cfg.num_generations, placement([len(prompts)], shard.world))
        rows, stats = pair_up(samples, rewards, "best-worst")
        stats.seconds = samples.seconds
        log(f"round {r}/{cfg.rounds}: {stats.summary()}; mean reward {statistics.fmean(rewards):.4f}")
        if not rows:
            raise RewardError(f"round {r}: every sampled group tied on reward; no pairs to train on")
        pairs_file = out / f"round-{r}" / "pairs.jsonl"
        if shard.is_main:
            write_jsonl(rows, pairs_file)
        shard.ctx.barrier()  # every rank's offline run reads the file
        # --resume auto: an interrupted round goes on from its own checkpoint (its pairs, sampled again from the same
        # model with the same seed, are the same)
        result = train_offline(TrainConfig.from_dict({**offline, "model": model, "data": str(pairs_file),
                                                      "output_dir": str(out / f"round-{r}"),
                                                      "resume": "auto" if cfg.resume else None}), log=log)
        model, steps = str(result.final_dir), steps + result.steps
        if metrics_file:
            metrics_file.write(json.dumps({"round": r, "step": steps, "reward": statistics.fmean(rewards),
                                           "reward_std": statistics.stdev(rewards), "pairs": stats.pairs,
                                           "ties": stats.ties, "identical": stats.identical,
                                           "completion_length": statistics.fmean(samples.lengths),
                                           "generation_s": samples.seconds}) + "\n")
            metrics_file.flush()
    final = out / "final"
    if metrics_file:
        metrics_file.close()
        shutil.copytree(model, final, dirs_exist_ok=True)
    shard.ctx.barrier()  # no rank exits before final/ is written
    log(f"saved {final} (the last round's model); per-round runs in {out}/round-*")
    return TrainResult(out, steps, None, None, final)


def _rounds_done(cfg: TrainConfig, log) -> dict[int, dict]:
    """--resume (auto) of iterative DPO, at round granularity: the rounds with a final/ and a metrics line, after
    refusing options other than those the run was started with. Reads only: every rank calls it."""
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
    done = {r: done[r] for r in range(1, complete + 1)}  # (iterative_dpo keeps their lines, drops later ones)
    log(f"--resume auto: rounds {', '.join(map(str, done)) or 'none'} complete; going on from round {len(done) + 1}")
    return done
