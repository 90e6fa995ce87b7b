"""The sweep's RL lines and its cost bookkeeping (tasks/sweep.py draws them; issue 17 parts 3 and 4).

`--online` methods, each trained on its own samples of the training prompts:
  grpo        GRPO on the task's reward (the ground truth, VADER);
  online-dpo  online DPO, best vs worst of each prompt's samples, scored by the task's reward;
  rlhf        the paper's foil: a Bradley–Terry reward model fitted to the sweep's own pairs_train.jsonl
              (`dpokit train-rm`: the same pairs, epochs, batch size and lr as the DPO runs' base settings; its
              held-out accuracy on pairs_eval.jsonl is recorded), then PPO against it, one series per KL
              coefficient of --rlhf-kl; the value model starts from the reward model (TRL's recipe);
  ppo-gt      PPO on the task's reward directly (the paper's PPO-GT), one series at --ppo-gt-kl.
The budget rule: every online method samples what GRPO's line samples — --online-steps steps × 16 prompts ×
the task's samples per prompt, same lr, warm-up and lengths (tasks/sweep_runs.py `online_train_config`); PPO then
makes TRL's default num_ppo_epochs = 4 passes over each rollout batch where GRPO makes one.

Costs recorded per series in frontier.json (`costs`), for the cost table (issue 17 part 4):
  train_seconds      wall time of training, sampling and reward calls included (not the held-out evaluation);
  peak_rss_gb        this process's peak resident memory during training (Linux: the high-water mark reset
                     before the run; elsewhere the process's peak so far), and rss_before_gb, what the sweep held
                     already (the reference it evaluates with, the reference's held-out samples);
  samples_generated  completions sampled while training (offline runs: 0; their pairs file's samples are
                     counted once, in frontier.json's `pairs`);
  reward_calls       completions the training reward scored; reward_model_calls: those scored by a neural reward
                     model (RLHF), not a function such as VADER;
  models             the networks training holds: policy, reference (offline: until its log-probs are computed
                     or read from the cache, then released), reward model, value model.
"""

from __future__ import annotations

import json
import math
import re
import resource
import shutil
import sys
import time
from pathlib import Path

from dpokit.config import ConfigError, TrainConfig

ONLINE_METHODS = {"grpo": "GRPO", "online-dpo": "Online DPO", "rlhf": "RLHF", "ppo-gt": "PPO-GT"}
DEFAULT_RLHF_KL = (0.02, 0.05, 0.1)
DEFAULT_PPO_GT_KL = 0.05  # TRL's PPO default
BUDGET = ("each online method samples as many completions as GRPO's line: --online-steps steps × 16 prompts × the "
          "task's samples per prompt, same lr, warm-up and lengths; PPO makes 4 passes (TRL's num_ppo_epochs) over "
          "each rollout batch; the reward model trains as the DPO runs' base settings (same pairs, epochs, batch "
          "size, lr)")


def parse_online(text: str | tuple | list) -> tuple[str, ...]:
    """'grpo,rlhf' → ('grpo', 'rlhf'), in --online's order; unknown or repeated names refused."""
    names = [m.strip() for m in text.split(",")] if isinstance(text, str) else [str(m).strip() for m in text]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in ONLINE_METHODS]
    if unknown:
        hint = " (PPO here is rlhf: against a reward model trained on the pairs, or ppo-gt: on the task's reward)" \
            if any(m.lower() == "ppo" for m in unknown) else ""
        raise ConfigError(f"--online: unknown method(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(ONLINE_METHODS)}{hint}")
    if len(set(names)) < len(names):
        raise ConfigError(f"--online {','.join(names)}: a method named twice")
    return tuple(names)


def parse_kl_list(text, flag: str = "--rlhf-kl") -> tuple[float, ...]:
    """'0.02,0.05' (or a sequence of numbers) → (0.02, 0.05): PPO's KL coefficients, each finite and >= 0, none
    repeated."""
    shown = text if isinstance(text, str) else ",".join(str(v) for v in text)
    values = []
    for part in (p.strip() for p in shown.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"{flag} {shown!r}: {part!r} is not a number; expected KL coefficients separated by "
                              "commas, e.g. 0.02,0.05,0.1") from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{flag} {shown!r}: {part} is out of range: a KL coefficient is finite and >= 0")
        values.append(value)
    if len(set(values)) < len(values):
        raise ConfigError(f"{flag} {shown!r}: a coefficient named twice")
    return tuple(values)


def check_rl_options(online: tuple[str, ...], rlhf_kl, ppo_gt_kl) -> tuple[tuple[float, ...], float]:
    """The KL coefficients of the rlhf series and of ppo-gt (None: the defaults); each refused when its method is
    not in --online (it would do nothing)."""
    for value, flag, method in ((rlhf_kl, "--rlhf-kl", "rlhf"), (ppo_gt_kl, "--ppo-gt-kl", "ppo-gt")):
        if value is not None and method not in online:
            raise ConfigError(f"{flag} is read by --online {method} only: add {method} to --online or drop {flag}")
    rlhf = parse_kl_list(rlhf_kl) if rlhf_kl is not None else DEFAULT_RLHF_KL
    gt = parse_kl_list([ppo_gt_kl] if isinstance(ppo_gt_kl, (int, float)) else ppo_gt_kl, "--ppo-gt-kl") \
        if ppo_gt_kl is not None else (DEFAULT_PPO_GT_KL,)
    if len(gt) != 1:
        raise ConfigError(f"--ppo-gt-kl {ppo_gt_kl!r}: one KL coefficient (PPO-GT is one series)")
    return rlhf, gt[0]


# ---- the reward model ---------------------------------------------------------------------------------------

def reward_model_config(out: Path, task, base: TrainConfig, progress: bool) -> TrainConfig:
    """`dpokit train-rm` on the sweep's pairs, trained as the DPO runs' base settings `base` are."""
    # max_length stays train-rm's default: the task's rows (≤ 64 prompt + max_new_tokens tokens) are far shorter, and
    # a max_length below the (unread) max_prompt_length default of 256 is refused by the config's range check
    values = dict(stage="reward_model", model=task.model, data=base.data, eval_data=base.eval_data,
                  output_dir=str(out / "reward-model"), batch_size=base.batch_size, epochs=base.epochs,
                  max_steps=base.max_steps, lr=base.lr, warmup_steps=base.warmup_steps, seed=task.seed,
                  progress=progress, memory_check=False)
    return TrainConfig.from_dict(values, source="sweep reward model")


def reward_model(out: Path, task, base: TrainConfig, progress: bool, log) -> dict:
    """Train the RLHF reward model, or reuse the one in out/reward-model trained with the same options; its record
    (options, held-out accuracy before and after training, costs) as saved in reward-model/rm.json."""
    from dpokit.loop import train
    from dpokit.tasks.sweep_runs import continue_or_start, count_pairs, result_options
    cfg = reward_model_config(out, task, base, progress)
    folder, saved = Path(cfg.output_dir), Path(cfg.output_dir) / "rm.json"
    options = json.loads(json.dumps(result_options(cfg)))
    if saved.is_file() and (folder / "final" / "config.json").is_file():
        record = json.loads(saved.read_text(encoding="utf-8"))
        if record["options"] == options:
            log(f"[reward model] reusing {folder / 'final'} (held-out accuracy {record['accuracy']:.3f})")
            return record
    log(f"[reward model] training a Bradley–Terry reward model on {cfg.data} → {folder}")
    continue_or_start(cfg, log)  # a run a signal stopped continues (tasks/sweep.py)
    with Meter() as cost:
        result = train(cfg, log=lambda *a, **k: None)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # final/ is what PPO reads
    after, before = result.eval_after or {}, result.eval_before or {}
    record = {"options": options, "final": str(result.final_dir), "accuracy": after.get("eval/accuracy"),
              "accuracy_before": before.get("eval/accuracy"), "eval_loss": after.get("eval/loss"),
              "eval_pairs": count_pairs(Path(cfg.eval_data), cfg), "steps": result.steps,
              "cost": {**cost.fields(), "models": ["reward model"], "models_held": 1,
                       **({"resumed_at_step": result.resumed_at} if result.resumed_at else {})}}
    log(f"[reward model] held-out accuracy {record['accuracy']:.3f} (untrained head: "
        f"{record['accuracy_before']:.3f}) in {cost.seconds / 60:.1f} min")
    saved.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


def rl_runs(out: Path, task, online: tuple[str, ...], steps: int, rlhf_kl, ppo_gt_kl: float, base: TrainConfig,
            progress: bool, log) -> tuple[list[tuple], dict | None]:
    """(method, series, folder, config, depends) of each `rlhf` and `ppo-gt` series, and the reward model's record
    (trained here, or reused) when rlhf is asked for. `depends`: what else a run's result depends on (the reward
    model's options), compared with a finished run's record before reusing it."""
    from dpokit.tasks.sweep_runs import online_train_config
    runs, rm = [], None
    if "rlhf" in online:
        rm = reward_model(out, task, base, progress, log)
        for kl in rlhf_kl:
            folder = out / f"rlhf-kl{kl:g}"
            runs.append(("RLHF", f"rlhf kl={kl:g}", folder,
                         online_train_config(folder, task, "PPO", steps, progress=progress, kl_coef=kl,
                                             reward=rm["final"]), {"reward_model": rm["options"]}))
    if "ppo-gt" in online:
        folder = out / "ppo-gt"
        runs.append(("PPO-GT", "ppo-gt", folder, online_train_config(folder, task, "PPO", steps, progress=progress,
                                                                     kl_coef=ppo_gt_kl), {}))
    return runs, rm


def rm_note(rm: dict) -> str:
    return (f"RLHF reward model (Bradley–Terry, trained on pairs_train.jsonl): held-out accuracy "
            f"{rm['accuracy']:.3f} "
            f"on {rm['eval_pairs']} pairs of pairs_eval.jsonl ("
            + (f"at its resume, step {rm['cost']['resumed_at_step']}" if rm["cost"].get("resumed_at_step")
               else "untrained head") + f" {rm['accuracy_before']:.3f}), "
            f"{rm['steps']} steps, {rm['cost']['train_seconds'] / 60:.1f} min")


# ---- costs ------------------------------------------------------------------------------------------------

def models_held(cfg: TrainConfig) -> list[str]:
    """The networks a run holds while it trains: the policy; the reference when the objective reads it (online:
    kl_coef > 0 or online DPO); a reward model when the training reward is a classifier folder; PPO's value model.
    A reward function such as VADER is no model."""
    from dpokit.evaluation.rewards import classifier_folder
    from dpokit.objectives import needs_reference
    if cfg.stage == "reward_model":
        return ["reward model"]
    roles = ["policy"]
    # as the loops decide it (loop/online.py `_load_online`, loop/reference.py)
    uses_reference = cfg.kl_coef > 0 if cfg.online and not cfg.online_dpo else needs_reference(cfg.loss_names)
    if uses_reference:
        roles.append("reference")
    if cfg.online and any(classifier_folder(s) for s in cfg.reward_specs):
        roles.append("reward model")
    if cfg.online and cfg.loss_names == ["ppo"]:
        roles.append("value")
    return roles


def samples_generated(cfg: TrainConfig) -> int:
    """Completions an online run samples: num_generations for each prompt of each step (the loop's own schedule:
    an epoch's last step may take fewer prompts); 0 for an offline run."""
    if not cfg.online:
        return 0
    from dpokit.data import load_prompts
    from dpokit.loop.schedule import BatchSchedule
    prompts, _ = load_prompts(cfg.prompts, cfg.on_bad_row)
    order = BatchSchedule(len(prompts), cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.shuffle)
    steps = order.total_steps(cfg.epochs, cfg.max_steps)
    return sum(len(order.step_rows(s)) for s in range(steps)) * cfg.num_generations


def run_cost(cfg: TrainConfig, steps: int) -> dict:
    """The costs that follow from a run's options (the measured ones come from `Meter`)."""
    from dpokit.evaluation.rewards import classifier_folder
    samples = samples_generated(cfg)
    updates = cfg.num_ppo_epochs * cfg.num_mini_batches if cfg.online and cfg.loss_names == ["ppo"] else \
        cfg.grpo_iterations if cfg.online and not cfg.online_dpo else 1
    models = models_held(cfg)
    by_model = cfg.online and any(classifier_folder(s) for s in cfg.reward_specs)
    return {"steps": steps, "optimizer_updates": steps * updates, "samples_generated": samples,
            "reward_calls": samples, "reward_model_calls": samples if by_model else 0,
            "models": models, "models_held": len(models)}


def _rss_gb(field: str) -> float | None:
    """VmHWM (peak) or VmRSS (now) of this process from /proc, in GiB; None where /proc is not Linux's."""
    try:
        found = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) / 2**20 if found else None


class Meter:
    """Wall time and peak resident memory of a block of work in this process. On Linux the peak is the kernel's
    high-water mark, reset to the current RSS on entry (/proc/self/clear_refs "5"); elsewhere (or when the reset
    is not allowed) it is getrusage's peak of the whole process so far, and `peak_rss_scope` says so."""

    def __enter__(self):
        self.rss_before = _rss_gb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "run"
        except OSError:
            self.scope = "process"
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        peak = _rss_gb("VmHWM") if self.scope == "run" else None
        if peak is None:  # ru_maxrss: KiB on Linux, bytes on macOS
            self.scope = "process"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
        self.peak = peak
        return False

    def fields(self) -> dict:
        return {"train_seconds": round(self.seconds, 2), "peak_rss_gb": round(self.peak, 3),
                "rss_before_gb": None if self.rss_before is None else round(self.rss_before, 3),
                "peak_rss_scope": self.scope}
