"""The reward_scoring stage's config, light: `python -m pipelines.spec check` builds it without importing
torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from components.config import require
from components.models.config import ModelLoading
from components.prompts import PromptSource
from components.training.config import RolloutEngine, Sampling


@dataclass(kw_only=True)
class RewardScoringConfig:
    """A reward_scoring stage: the model, the rewards, and the parts `prompts`, `sampling` and `loading`."""

    model: str
    """The policy to sample from: a Hugging Face directory with safetensors weights."""
    output_dir: str
    """Where scored.jsonl, pairs.jsonl and stats.json go."""
    prompts: PromptSource
    """The prompts sampled from: a JSONL (`path`) or a bundled task (components/prompts.py)."""
    sampling: Sampling = field(default_factory=Sampling)
    """Temperature, top_p, max_new_tokens of the samples (components/README.md)."""
    loading: ModelLoading = field(default_factory=ModelLoading)
    """How the model is loaded (components/README.md)."""
    rollout: RolloutEngine = field(default_factory=RolloutEngine)
    """The rollout engine that samples: hf or vllm (components/README.md)."""
    rewards: list[dict] = field(default_factory=lambda: [{"name": "task"}])
    """Reward functions and weights (components/rewards)."""
    num_samples: int = 4
    """k: completions sampled per prompt."""
    seed: int = 0
    """Sampling seed (and the seed of a generated task's prompts)."""
    min_pairs: int = 1
    """Fewest preference pairs the stage must make; fewer (every prompt's samples tied, say) fail it, before a
    DPO stage is run on too few pairs."""

    def __post_init__(self):
        require(isinstance(self.num_samples, int) and self.num_samples >= 2, "num_samples", self.num_samples,
                "an integer ≥ 2 (a pair needs two)")
        require(isinstance(self.min_pairs, int) and not isinstance(self.min_pairs, bool) and self.min_pairs >= 1,
                "min_pairs", self.min_pairs, "a positive integer")
