"""Evaluation: does a post-trained model generalize, and is it better than the one it would replace?

- `config`: the stage's config and the rules of its suites and metric names (light: a spec check reads them);
- `main`: the evaluate stage (candidate and baselines on the same prompts and seeds → eval.json);
- `report`: the self-contained HTML report of one or many stages.

Nothing is imported here: `report` needs only numpy and matplotlib. The suites, statistics and the sampling and
scoring of a suite are shared with evaluation during training: components/evaluation.
"""
