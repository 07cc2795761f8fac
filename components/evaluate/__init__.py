"""Evaluation: does a post-trained model generalize, and is it better than the one it would replace?

- `config`: the stage's config and the rules of its suites and metric names (light: a spec check reads them);
- `stats`: pass@k (unbiased), avg@n, bootstrap intervals over prompts, paired differences;
- `main`: the evaluate stage (candidate and baselines on the same prompts and seeds → eval.json);
- `report`: the self-contained HTML report of one or many stages.

Nothing is imported here: `stats` and `report` need only numpy and matplotlib.
"""
