"""Checks shared by the tests of the vllm rollout engine's weight sync (3 one-step rounds of grpo)."""

from __future__ import annotations

from collections.abc import Callable

GAP = "sampling/sampling_logp_difference/max"


def assert_on_policy(hist: list[dict]) -> None:
    """Every round's first step: the trainer's log-probs of the sampled tokens equal the engine's to 1e-4 (fp32); the
    engine was synced after steps 1 and 2, not after the last, and the steps changed the policy."""
    assert [h["step"] for h in hist] == [1, 2, 3]
    gaps = [h[GAP] for h in hist]
    assert all(gap < 1e-4 for gap in gaps), gaps
    assert hist[1]["rollout/sync_s"] > 0 and hist[2]["rollout/sync_s"] == 0  # no sync after the last step
    assert all(h["grad_norm"] > 0 for h in hist[:2])


def assert_stale_without_the_second_sync(monkeypatch, run: Callable[[], list[dict]]) -> None:
    """`run()` (the metrics of a run) with VLLMEngine.sync skipping its second call: round 3 samples from the weights
    before step 2, and the gap says so (the check above cannot pass on a skipped sync)."""
    from components.training.engines import VLLMEngine

    real_sync, calls = VLLMEngine.sync, []

    def skip_second(self, model, tokenizer=None):
        calls.append(1)
        if len(calls) != 2:
            real_sync(self, model, tokenizer)

    monkeypatch.setattr(VLLMEngine, "sync", skip_second)
    stale = run()
    assert len(calls) == 2
    assert stale[1][GAP] < 1e-4  # the first sync happened
    assert stale[2][GAP] > 1e-2  # round 3 sampled from the weights before step 2
