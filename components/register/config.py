"""The register stage's config, light: `python -m pipelines.spec check` builds it without the MLflow client."""

from __future__ import annotations

from dataclasses import dataclass

from components import promotion as promote


@dataclass(kw_only=True)
class RegisterConfig:
    """What to register under which name, with which eval, and whether to run the promotion gate."""

    model: str
    """The final model: a Hugging Face directory with safetensors weights, a local path or s3:// URI."""
    name: str
    """Registered model name (the spec's); created on first use."""
    output_dir: str
    """Where register.json goes."""
    eval: str | None = None
    """Eval JSON of the evaluate stage (local or s3://): its `metrics` become version tags eval.<metric>; a model
    without one (or with no metrics in it) is not registered."""
    promotion: dict | None = None
    """Promotion rule {metric, direction, min_improvement, guards}; when set (needs `eval`) the gate runs."""
    parent_run_id: str | None = None
    """The pipeline's parent run (default: env POSTTRAIN_PARENT_RUN_ID)."""

    def __post_init__(self):
        if not self.name or any(c in self.name for c in "/:%'\""):
            raise ValueError(f"name={self.name!r} is invalid: a non-empty name without / : % or quotes")
        if self.promotion is not None:
            promote.PromotionRule.from_mapping(self.promotion)
            if self.eval is None:
                raise ValueError("promotion is set but eval is not: the gate compares eval metrics; set eval")
