"""The engine's config parts and the names its settings take: what a stage's config needs to validate itself
without importing torch (`python -m pipelines.spec check` builds every stage's config from these).

- `TrainConfig`: the `train` part of every training stage; `Adapter`: the `lora` part (components/training/lora.py
  applies it); `Sampling`: the `sampling` part of the stages that sample; `RolloutEngine`: the `rollout` part
  (components/training/engines.py builds the engine it names);
- the names an objective's setting takes (components/training/objectives.py implements each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from components.config import positive_ints, require

if TYPE_CHECKING:
    import torch

    from components.training.engines import Engine
    from components.training.rollout import Rollout


@dataclass(kw_only=True)
class TrainConfig:
    """How to train, whatever the objective: the `train` part of every training stage's config."""

    max_steps: int = 100
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences (DPO: pairs) per optimizer step, over all ranks."""
    token_budget: int = 4096
    """Most tokens in one packed micro-batch; gradients accumulate over the micro-batches of a step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr × min_lr_ratio at max_steps."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only (not to norms and biases)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's (β1, β2)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 0
    """Seed of the data order (and of every other random choice of the stage)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: none; the stage saves the final model either way)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep (for resume)."""
    keep_top_k: int = 0
    """Besides the latest, keep the k checkpoints best by checkpoint_metric (0: off)."""
    checkpoint_metric: str | None = None
    """What ranks checkpoints: a metric of the checkpoint step's record, an `eval/<suite>/<metric>` one of the
    stage's `eval` part (which must then evaluate at every checkpoint step), e.g. `eval/arithmetic-id/accuracy`."""
    checkpoint_mode: str = "max"
    """max: a larger checkpoint_metric is better; min: a smaller one."""
    export: str = "last"
    """What the stage outputs: last (the weights after max_steps) or best (the best by checkpoint_metric of the
    kept checkpoints and the last step; a tie goes to the later step)."""
    precision: str = "auto"
    """fp32 | bf16-mixed (bf16 autocast, fp32 weights and optimizer) | auto (bf16-mixed on GPU, fp32 on CPU)."""
    loss_chunk_size: int = 2048
    """Tokens per chunk of the language-model head, log-softmax and entropy."""
    log_every: int = 10
    """Log a metrics line every N steps (every step is written to metrics.jsonl)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (2 or 3) when WORLD_SIZE > 1."""
    zero3_param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters of at most this many elements stay whole on every rank instead of partitioned
    (DeepSpeed's stage3_param_persistence_threshold); 0 partitions every parameter, as a large model's are."""
    offload: bool = False
    """DeepSpeed: offload optimizer states (and with stage 3, parameters) to CPU."""
    allow_config_change: bool = False
    """Resume from a checkpoint written under another config or data (the differing keys are logged); by default
    such a resume is refused, naming the keys (and data files) that differ."""
    max_nonfinite_steps: int = 0
    """Steps with a non-finite loss or gradient norm tolerated (skipped and logged) before the stage stops."""
    collapse_steps: int = 20
    """Warn when the loss has not moved or the gradient norm was 0 for this many steps in a row (0: never)."""

    def __post_init__(self):
        positive_ints(self, "max_steps", "batch_size", "token_budget", "loss_chunk_size", "log_every",
                      "keep_checkpoints")
        for name in ("warmup_steps", "checkpoint_every", "max_nonfinite_steps", "collapse_steps"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, getattr(self, name),
                    "an integer ≥ 0")
        require(isinstance(self.keep_top_k, int) and not isinstance(self.keep_top_k, bool) and self.keep_top_k >= 0,
                "keep_top_k", self.keep_top_k, "an integer ≥ 0")
        require(self.checkpoint_mode in ("max", "min"), "checkpoint_mode", self.checkpoint_mode, "max or min")
        require(self.export in ("last", "best"), "export", self.export, "last or best")
        ranked = self.keep_top_k > 0 or self.export == "best"
        require(not ranked or (isinstance(self.checkpoint_metric, str) and self.checkpoint_metric != ""),
                "checkpoint_metric", self.checkpoint_metric,
                "a metric name (e.g. eval/<suite>/accuracy): keep_top_k and export best rank checkpoints by it")
        require(not ranked or self.checkpoint_every > 0, "checkpoint_every", self.checkpoint_every,
                "> 0: keep_top_k and export best choose among checkpoints")
        require(self.export != "best" or self.keep_top_k >= 1, "keep_top_k", self.keep_top_k,
                "≥ 1 with export best (the best checkpoint must be kept to be exported)")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "a positive number")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, name, value, "a number ≥ 0")
        require(self.precision in ("auto", "fp32", "bf16-mixed"), "precision", self.precision,
                "auto, fp32 or bf16-mixed")
        require(self.zero_stage in (2, 3), "zero_stage", self.zero_stage, "2 or 3")
        threshold = self.zero3_param_persistence_threshold
        require(isinstance(threshold, int) and not isinstance(threshold, bool) and threshold >= 0,
                "zero3_param_persistence_threshold", threshold, "an integer ≥ 0")
        betas = tuple(self.adam_betas)
        require(len(betas) == 2 and all(isinstance(beta, (int, float)) and 0 <= beta < 1 for beta in betas),
                "adam_betas", self.adam_betas, "two numbers in [0, 1): (β1, β2)")
        self.adam_betas = betas


def bf16_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the stage computes in bf16 (autocast): precision bf16-mixed, or auto on a GPU."""
    return cfg.precision == "bf16-mixed" or (cfg.precision == "auto" and device.type == "cuda")


def check_clip_range(epsilon_low: float, epsilon_high: float) -> None:
    """The clip range (1 − ε_low, 1 + ε_high) of PSFT, GRPO and PPO."""
    require(0 < epsilon_low < 1, "epsilon_low", epsilon_low, "a number in (0, 1)")
    require(math.isfinite(epsilon_high) and epsilon_high > 0, "epsilon_high", epsilon_high, "a positive number")


OUTPUTS = ("merged", "adapter")
QUANTIZE = ("none", "4bit", "8bit")


@dataclass(kw_only=True)
class Adapter:
    """LoRA/QLoRA through peft (off by default): the `lora` part of the sft, dpo, grpo and ppo (actor) stages'
    configs."""

    enabled: bool = False
    """Train low-rank adapters on the frozen base model instead of every weight."""
    r: int = 16
    """Rank of each adapter."""
    alpha: float = 32.0
    """Scale of the adapters: their update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapters' input while training."""
    target_modules: str | list[str] = "all-linear"
    """The modules that get an adapter: all-linear (every linear layer but the output head) or a list of module
    names (e.g. [q_proj, v_proj])."""
    output: str = "merged"
    """What model/ holds: merged (the base with the adapter merged in, a plain Hugging Face directory) or adapter
    (peft's adapter directory and the tokenizer, to load on the base model)."""
    quantize: str = "none"
    """QLoRA: load the frozen base in 4bit (NF4, bf16 compute) or 8bit; needs a CUDA device with bitsandbytes.
    none: the base in full precision."""

    def __post_init__(self):
        require(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, "r", self.r,
                "a positive integer")
        require(self.alpha > 0, "alpha", self.alpha, "a positive number")
        require(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        names = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        require(bool(names) and all(isinstance(name, str) and name for name in names), "target_modules",
                self.target_modules, "all-linear or a non-empty list of module names")
        require(self.output in OUTPUTS, "output", self.output, f"one of {', '.join(OUTPUTS)}")
        require(self.quantize in QUANTIZE, "quantize", self.quantize, f"one of {', '.join(QUANTIZE)}")
        require(self.quantize == "none" or self.enabled, "quantize", self.quantize,
                "none unless enabled is true (QLoRA trains adapters on the quantized base)")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                          target_modules=self.target_modules, task_type="CAUSAL_LM")


@dataclass(kw_only=True)
class Sampling:
    """How completions are sampled: the `sampling` part of the stages that sample to train on or to score
    (reward_scoring, grpo, ppo)."""

    temperature: float = 1.0
    """Sampling temperature (the log-probs are those of softmax(logits / temperature))."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 64
    """Most tokens per completion."""
    generation_batch_size: int = 256
    """Sequences decoded together by the rollout."""

    def __post_init__(self):
        require(math.isfinite(self.temperature) and self.temperature > 0, "temperature", self.temperature,
                "a positive number (the stage samples)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        positive_ints(self, "max_new_tokens", "generation_batch_size")

    def sample(self, engine, prompts: list, *, n: int, seed: int, indices: list[int] | None = None) -> Rollout:
        """`n` completions per prompt with these settings from a rollout engine (components/training/engines.py);
        `indices`: each prompt's index in the whole prompt set (default: its place in `prompts`), for its seeds."""
        return engine.generate(prompts, n=n, temperature=self.temperature, top_p=self.top_p,
                               max_new_tokens=self.max_new_tokens, seed=seed, batch_size=self.generation_batch_size,
                               indices=indices)


ENGINES = ("hf", "vllm")


@dataclass(kw_only=True)
class RolloutEngine:
    """What samples the completions: the `rollout` part of the stages that sample (reward_scoring, grpo, ppo,
    evaluate)."""

    engine: str = "hf"
    """hf (Hugging Face generate on the training model, a seeded sampler of the project) or vllm (a colocated
    in-process vLLM engine, weights synced after each optimizer step; needs the `rollout` extra or the trainer
    image)."""
    gpu_memory_utilization: float = 0.3
    """vllm on a GPU: the share of GPU memory the engine takes for its weights and KV cache (the trainer keeps
    the rest)."""
    kv_cache_gib: float = 1.0
    """vllm on CPU: the KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, unless the environment sets it)."""
    dtype: str = "auto"
    """vllm: the engine's weights and compute, float32 or bfloat16; auto: float32 on CPU (its log-probs match the
    trainer's), bfloat16 on a GPU."""
    max_model_len: int | None = None
    """vllm: the longest prompt + completion in tokens the engine accepts (default: the model's)."""
    sync_timeout_s: float = 300.0
    """vllm: most seconds one weight sync may take; a slower or failed sync stops the stage with an error."""
    tensor_parallel_size: int = 1
    """vllm in evaluate and reward_scoring: accelerators each engine's weights are split over (tensor parallelism,
    for a model larger than one accelerator). The stage's processes (one per accelerator) form groups of this
    many, each one engine, and the groups split the prompts; it must divide them. 1 with the hf engine."""
    sleep_while_training: bool = False
    """vllm on a GPU: after sampling the engine sleeps (vLLM's sleep mode: KV cache freed, weights discarded until
    the next sync pushes them, or with LoRA kept in host memory) and wakes before the next sync or sampling,
    leaving the trainer the memory. Off by default; refused on CPU, where vLLM has no sleep mode (not testable on
    CPU)."""

    def __post_init__(self):
        require(self.engine in ENGINES, "engine", self.engine, f"one of {', '.join(ENGINES)}")
        require(isinstance(self.gpu_memory_utilization, float) and 0 < self.gpu_memory_utilization < 1,
                "gpu_memory_utilization", self.gpu_memory_utilization, "a number in (0, 1)")
        require(math.isfinite(self.kv_cache_gib) and self.kv_cache_gib > 0, "kv_cache_gib", self.kv_cache_gib,
                "a positive number of GiB")
        require(self.dtype in ("auto", "float32", "bfloat16"), "dtype", self.dtype, "auto, float32 or bfloat16")
        require(self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 8),
                "max_model_len", self.max_model_len, "null or an integer ≥ 8")
        require(math.isfinite(self.sync_timeout_s) and self.sync_timeout_s > 0, "sync_timeout_s",
                self.sync_timeout_s, "a positive number of seconds")
        require(isinstance(self.tensor_parallel_size, int) and not isinstance(self.tensor_parallel_size, bool)
                and self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size,
                "a positive integer")
        require(self.tensor_parallel_size == 1 or self.engine == "vllm", "tensor_parallel_size",
                self.tensor_parallel_size, "1 with engine hf (it samples with a whole model per process); "
                "tensor parallelism needs engine: vllm")
        require(isinstance(self.sleep_while_training, bool)
                and (not self.sleep_while_training or self.engine == "vllm"), "sleep_while_training",
                self.sleep_while_training, "true or false; true needs engine: vllm")

    def build(self, model, tokenizer, *, seed: int = 0, max_num_seqs: int = 256, world_size: int = 1) -> Engine:
        """The engine over `model` (the trainer's; vllm: a copy of its weights at this moment). world_size: the
        stage's processes (torchrun's WORLD_SIZE), which the vllm engine then spans with vLLM's external launcher."""
        from components.training.engines import HFEngine, VLLMEngine

        if self.engine == "hf":
            return HFEngine(model, tokenizer)
        return VLLMEngine(model, tokenizer, self, seed=seed, max_num_seqs=max_num_seqs, world_size=world_size)

    def build_from(self, path, tokenizer, *, seed: int = 0, max_num_seqs: int = 256, world_size: int = 1) -> Engine:
        """vllm: the engine over the model directory `path`, which it loads itself (split over
        tensor_parallel_size accelerators), with no Hugging Face copy in this process; `load(path)` moves it to
        another model. The stage checks that `path` is a model directory first. The hf engine samples with a loaded
        model: use `build`."""
        from components.training.engines import VLLMEngine

        if self.engine == "hf":
            raise ValueError("the hf rollout engine samples with a loaded model: use build(model, tokenizer)")
        return VLLMEngine(Path(path), tokenizer, self, seed=seed, max_num_seqs=max_num_seqs, world_size=world_size)


def check_round_checkpoints(train, steps_per_round: int) -> None:
    """A checkpoint sits between rollout rounds: train.checkpoint_every must be a multiple of a round's steps."""
    require(train.checkpoint_every % steps_per_round == 0, "train.checkpoint_every", train.checkpoint_every,
            f"a multiple of the {steps_per_round} optimizer steps of a round (a checkpoint sits between rounds)")


def check_ranking(train, eval_every: int, metrics: list[str], where: str = "eval.every") -> None:
    """train.keep_top_k / export best rank checkpoints by a metric an evaluation of the stage records: one of
    `metrics` (a name, or a prefix ending in "/": eval/<suite>/ of the stage's eval part), at every checkpoint
    step (`eval_every`, the key `where`, dividing train.checkpoint_every). A stage that evaluates nothing during
    training passes 0 and no metrics."""
    if not (train.keep_top_k or train.export == "best"):
        return
    metric = train.checkpoint_metric
    known = any(metric == m or (m.endswith("/") and metric.startswith(m) and len(metric) > len(m)) for m in metrics)
    require(known, "train.checkpoint_metric", metric, "a metric the stage's evaluation during training records ("
            + (", ".join(f"{m}<metric>" if m.endswith("/") else m for m in metrics) or "none: the stage has no "
               "evaluation set up") + ")")
    require(eval_every > 0 and train.checkpoint_every % eval_every == 0, where, eval_every,
            f"a divisor of train.checkpoint_every ({train.checkpoint_every}): every checkpoint is ranked by its "
            "step's evaluation")


SCALE_REWARDS = ("group", "batch", "none")
"""grpo's scale_rewards (objectives.group_advantages)."""
LOSS_AGGREGATIONS = ("token", "sequence", "constant")
"""grpo's loss_aggregation (objectives.aggregation_weights)."""
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
"""dpo's loss_type (objectives.dpo_loss)."""
KL_CONTROLLERS = ("fixed", "adaptive")
"""ppo's kl_controller (objectives.KLController)."""
KL_IN_REWARD = {"grpo": False, "rloo": False, "reinforce_pp": True}
"""Each advantage estimator grpo's `advantage` selects (advantages.ADV_ESTIMATOR_REGISTRY) → whether β weighs a KL
folded into its reward instead of a KL term of the loss."""
