"""The evaluate stage's config and the rules of its suites and metric names, light: `python -m pipelines.spec
check` checks a spec's eval_suites and its promotion rule's metrics with them, without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from components.config import Invalid
from components.evaluation.stats import BOOTSTRAP_SAMPLES
from components.evaluation.suites import (
    HELDOUT,
    NAME,
    RESERVED_NAMES,
    check_sampling,
    normalize_suite,
    normalize_suites,
)
from components.models.config import ModelLoading
from components.training.config import RolloutEngine

TEACHER_FORCED = ("entropy", "kl_to_base")


def default_reward_specs(suites: list[dict]) -> list[dict]:
    """The verifier of every task the suites name: the rewards reported when the config lists none (suites whose
    rows name their tasks: the `task` reward, each row's own verifier)."""
    return [{"name": t} for t in sorted({s["task"] for s in suites if s.get("task")})] or [{"name": "task"}]


@dataclass(kw_only=True)
class EvaluateConfig:
    """An evaluation: which models, on which prompts, sampled how, and where the results go."""

    model: str
    """Candidate model: a Hugging Face directory (safetensors) or s3:// URI."""
    output_dir: str
    """Where eval.json, metrics.json, samples.jsonl and report.html go."""
    suites: list[dict]
    """Eval suites: {task, split (id|ood), n_prompts, seed, name?} (name defaults to <task>-<split>) or
    {name, data: JSONL of {prompt, answer, task?, split?} rows, task?: verifier for rows without one, split?}."""
    loading: ModelLoading = field(default_factory=ModelLoading)
    """How the models are loaded (components/README.md)."""
    rollout: RolloutEngine = field(default_factory=RolloutEngine)
    """The rollout engine that samples every model: hf or vllm (components/README.md)."""
    name: str = "candidate"
    """The candidate's name in the report (e.g. the stage that produced it)."""
    run_name: str = ""
    """The pipeline run this evaluation belongs to ("<spec name> <run id>"), the report's title; empty (a stage
    run alone): the report is titled by the candidate's name."""
    baselines: dict[str, str] = field(default_factory=dict)
    """Models to compare with, by name (e.g. base, the previous stage, champion): the same prompts and seeds."""
    parents: dict[str, str] = field(default_factory=dict)
    """Each trained model → the model it started from (names of the candidate or baselines, e.g. {psft: base,
    dpo: psft, grpo: dpo}): each one's effect on accuracy is measured against its parent and against the first
    ancestor (the base model)."""
    base_model: str | None = None
    """The base model that kl_to_base is measured against (it may also be a baseline); unset: no KL."""
    samples: int = 1
    """Completions per prompt (n of avg@n and pass@k); more than one needs a temperature > 0."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = 32
    """Longest completion in tokens."""
    k: list[int] = field(default_factory=lambda: [1])
    """The k of each pass@k reported (each ≤ samples)."""
    rewards: list[dict] | None = None
    """Reward specs (components.rewards); default: the verifier of each task the suites name."""
    heldout_text: str | None = None
    """SFT JSONL ({prompt, completion} or {messages}): entropy and kl_to_base teacher-forced on its completions."""
    max_length: int = 1024
    """Longest teacher-forced sequence in tokens; longer held-out rows are truncated."""
    seed: int = 0
    """Seed of the sampling (the same for every model) and of the bootstrap; the default seed of task suites."""
    bootstrap_samples: int = BOOTSTRAP_SAMPLES
    """Bootstrap resamples per interval."""
    batch_size: int = 64
    """Sequences decoded together."""
    token_budget: int = 4096
    """Most tokens in one teacher-forced micro-batch."""
    training_metrics: dict[str, str] = field(default_factory=dict)
    """metrics.jsonl of earlier stages by stage name, in the order they trained (the report's step axis), for the
    report's entropy and reward curves."""
    teacher_forced: bool = True
    """Measure entropy and kl_to_base teacher-forced on reference completions, with a Hugging Face copy of each
    model (and of base_model) on rank 0's accelerator. false: neither is measured, and with rollout.engine vllm no
    process loads a Hugging Face copy (a model larger than one accelerator, sampled tensor-parallel)."""

    def __post_init__(self):
        def bad(key, allowed):
            raise ValueError(f"{key}={getattr(self, key)!r} is invalid: {allowed}")
        for key in ("max_length", "bootstrap_samples", "token_budget"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(key, "a positive integer")
        try:
            self.k = check_sampling(self)
        except Invalid as e:  # this stage keeps its messages: `key=value is invalid: ...`
            raise ValueError(str(e)) from None
        names = [self.name, *self.baselines]
        for n in names:
            if not isinstance(n, str) or not NAME.fullmatch(n) or n in RESERVED_NAMES:
                raise ValueError(f"model name {n!r} is invalid: letters, digits, '_', '.', '-', "
                                 f"not one of {', '.join(RESERVED_NAMES)}")
        if self.name in self.baselines:
            bad("name", f"a name that is not also a baseline ({', '.join(self.baselines)})")
        if not isinstance(self.parents, dict) or any(n not in names for kv in self.parents.items() for n in kv):
            bad("parents", f"a mapping between model names among {', '.join(names)}")
        for n in self.parents:
            if self.lineage(n)[-1] in self.parents:  # the walk stopped at a repeat, not at a root
                bad("parents", f"a mapping without a cycle (through {n})")
        self.suites = normalize_suites(self.suites, self.seed)
        if self.rewards is not None and not all(isinstance(r, dict) for r in self.rewards):
            bad("rewards", "a list of reward specs (mappings with a 'name')")
        if not isinstance(self.teacher_forced, bool):
            bad("teacher_forced", "true or false")
        if self.heldout_text is not None and not self.teacher_forced:
            bad("heldout_text", "unset with teacher_forced false (held-out text is only measured teacher-forced)")

    def lineage(self, name: str) -> list[str]:
        """`name`, its parent, its parent's parent, ... up to a model without one (a cycle stops at a repeat)."""
        out = [name]
        while out[-1] in self.parents and self.parents[out[-1]] not in out:
            out.append(self.parents[out[-1]])
        return out

    def reward_specs(self) -> list[dict]:
        return self.rewards if self.rewards is not None else default_reward_specs(self.suites)

    def metric_names(self, reward_names: list[str]) -> set[str]:
        """Every `<suite>/<metric>` this evaluation writes for a model (reward_names: RewardSet.names)."""
        return metric_names(self.suites, self.k, reward_names, kl_to_base=self.base_model is not None,
                            heldout=self.heldout_text is not None, teacher_forced=self.teacher_forced)

    @property
    def needs_teacher(self) -> bool:
        """Some suite (a task's, with reference completions) or the held-out text is measured teacher-forced."""
        return self.teacher_forced and (self.heldout_text is not None or any("data" not in s for s in self.suites))


def per_prompt_metric_names(k_list: list[int], reward_names: list[str]) -> list[str]:
    """The metrics with one value per prompt: they get bootstrap intervals and paired differences."""
    return ["accuracy", *(f"pass@{k}" for k in sorted(set(k_list))), *(f"reward/{r}" for r in reward_names),
            "length"]


def metric_names(suites: list[dict], k_list: list[int], reward_names: list[str], *, kl_to_base: bool = False,
                 heldout: bool = False, teacher_forced: bool = True) -> set[str]:
    """Every metric name eval.json carries for a model, so a promotion rule can be checked before a run.

    suites: as in the evaluate config (short or full form); k_list: the pass@k k's; reward_names: the names of
    the reward functions (RewardSet.names); kl_to_base: a base model is set; heldout: heldout_text is set;
    teacher_forced: the evaluation's `teacher_forced`. Task suites add teacher-forced `entropy` (and
    `kl_to_base`); data suites carry no reference completions.
    """
    teacher = ["entropy", *(["kl_to_base"] if kl_to_base else [])] if teacher_forced else []
    names = set()
    for i, raw in enumerate(suites):
        s = normalize_suite(raw, f"suites[{i}]", 0)
        for m in per_prompt_metric_names(k_list, reward_names):
            names |= {f"{s['name']}/{m}", f"{s['name']}/{m}_ci_low", f"{s['name']}/{m}_ci_high"}
        if "data" not in s:
            names |= {f"{s['name']}/{m}" for m in teacher}
    if heldout:
        names |= {f"{HELDOUT}/{m}" for m in teacher}
    return names
