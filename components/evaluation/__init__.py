"""Evaluation by generation, shared by the evaluate stage and by evaluation during training (the `eval` part of
sft, dpo, grpo and ppo).

- `suites`: suites and sampling settings, and the `eval` part's config (light: a spec check reads them);
- `stats`: pass@k (unbiased), avg@n, bootstrap intervals over prompts, paired differences;
- `scoring`: a suite's rows, sampled, verified and scored (one code path for both);
- `during_training`: the evaluator a training stage hands its Session, and the reward-hacking watch.
"""
