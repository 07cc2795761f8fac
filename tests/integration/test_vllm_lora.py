"""LoRA with the vllm rollout engine, real vLLM on CPU (fp32) over the tiny model: the engine holds the base with the
adapters merged in, each sync pushing the merged weights of the modules that hold adapters (lora.merged_weights)
while the trainer goes on training the adapters. vLLM comes with the `rollout` extra (`make install`)."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import get_peft_model

from components.config import from_mapping
from components.grpo.config import GRPOConfig
from components.grpo.main import run as run_grpo
from components.models import load_model
from components.training.config import Adapter
from components.training.lora import merged_weights
from tests.engine_checks import assert_on_policy, assert_stale_without_the_second_sync
from tests.torchrun import REPO, free_port, rank_env


@pytest.fixture(autouse=True)
def small_engine(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def adapted(model_dir, target_modules):
    model = get_peft_model(load_model(model_dir), Adapter(enabled=True, r=4, alpha=8, dropout=0.0,
                                                          target_modules=target_modules).peft_config())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as if trained: B is 0 at the start, which would make every merge a no-op
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def test_merged_weights_are_peft_s_merge_without_merging_in_place(tiny_model_dir):
    model = adapted(tiny_model_dir, "all-linear")
    before = {name: param.clone() for name, param in model.named_parameters()}
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    got = dict(merged_weights(model, everything=True))
    assert set(got) == set(expected)  # the base checkpoint's names, no peft prefixes
    assert max(float((got[name] - expected[name]).abs().max()) for name in got) < 1e-6
    assert any(float((got[name] - model.get_base_model().state_dict()[name.replace(".weight", ".base_layer.weight")])
                     .abs().max()) > 1e-3 for name in got if name.endswith("q_proj.weight"))  # the adapters count
    for name, param in model.named_parameters():  # the trainer's model is untouched: nothing merged in place
        assert torch.equal(param, before[name]), name

    # a sync pushes the modules that hold adapters, whole (vLLM fuses q, k, v and gate, up): not the frozen rest
    synced = [name for name, _ in merged_weights(adapted(tiny_model_dir, ["q_proj"]))]
    layers = load_model(tiny_model_dir).config.num_hidden_layers
    assert sorted(synced) == sorted(f"model.layers.{i}.self_attn.{part}" for i in range(layers) for part in (
        "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
        "o_proj.weight"))


def grpo_settings(model_dir, target_modules, **train) -> dict:
    # 4 prompts × 4 samples a round, one optimizer step per round, 3 rounds (unless `train` says); dropout 0: the
    # trainer's log-probs are then exactly the policy's
    return {"model": str(model_dir), "prompts": {"task": "arithmetic", "task_rows": 16}, "prompts_per_round": 4,
            "num_generations": 4, "sampling": {"max_new_tokens": 8, "temperature": 1.0},
            "rollout": {"engine": "vllm", "sync_timeout_s": 120},
            "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": target_modules},
            "rewards": [{"name": "format", "pattern": "(?s)[0-9A-Za-z].*"}],
            "train": {"batch_size": 16, "lr": 3e-2, "max_steps": 3, "log_every": 1, **train}}


def grpo_config(model_dir, out, target_modules):
    return from_mapping(GRPOConfig, {**grpo_settings(model_dir, target_modules), "output_dir": str(out)})


def test_grpo_with_lora_keeps_the_vllm_engine_on_policy(tiny_model_dir, tmp_path, monkeypatch):
    """Each round samples with the engine, then trains the adapters one step: the round's first step compares the
    trainer's log-probs of the sampled tokens with the engine's (sampling/sampling_logp_difference/*). With every
    sync they agree to 1e-4 (fp32); with the second sync skipped the engine samples from stale weights and the check
    fails. Adapters on q, v and gate only: k and up, not adapted, are pushed beside them (vLLM fuses them)."""
    from vllm.model_executor.model_loader.reload import layerwise

    warned, emit = [], layerwise.logger.callHandlers  # what passes the logger's filters (handlers get reset)
    monkeypatch.setattr(layerwise.logger, "callHandlers", lambda record: (warned.append(record.getMessage()),
                                                                          emit(record)))
    run_grpo(grpo_config(tiny_model_dir, tmp_path / "synced", ["q_proj", "v_proj", "gate_proj"]))
    assert not [text for text in warned if "RMSNorm" in text]  # the frozen layers a sync leaves are not warned of
    assert_on_policy(lines(tmp_path / "synced" / "metrics.jsonl"))  # the steps changed the adapters too
    assert_stale_without_the_second_sync(monkeypatch, lambda: (
        run_grpo(grpo_config(tiny_model_dir, tmp_path / "skipped", "all-linear")),
        lines(tmp_path / "skipped" / "metrics.jsonl"))[1])


SKIP_SYNC = """
from components.grpo.main import main
from components.training.engines import VLLMEngine

real, calls = VLLMEngine.sync, []


def sync(self, model, tokenizer=None):
    calls.append(1)
    if len(calls) != {skipped}:
        real(self, model, tokenizer)


VLLMEngine.sync = sync
main()
"""


def run_two_ranks(settings: dict, out: Path, skip_sync: int | None = None) -> list[dict]:
    """grpo under torchrun with 2 processes (gloo, DeepSpeed), each rank with its own vLLM engine; with
    `skip_sync` each rank's engine misses that sync (1: the first). Its metrics.jsonl rows."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({**settings, "output_dir": str(out)}))
    entry = ["-m", "components.grpo"]
    if skip_sync:
        script = out.parent / f"{out.name}_skip.py"
        script.write_text(SKIP_SYNC.replace("{skipped}", str(skip_sync)))
        entry = [str(script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *entry, "--config", str(config)]
    env = rank_env(tracking=False, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_with_lora_and_a_vllm_engine_per_rank(tiny_model_dir, tmp_path):
    """2 ranks, each with its engine, ZeRO-3 with every parameter partitioned (the base and the adapters): each
    sync gathers a block's shards to merge it, and every engine stays within 1e-4 of the trainer (the gap's max is
    over both ranks) through the first two syncs; each rank's third sync skipped, round 4 is stale, so the check
    cannot pass on a missed sync. (ZeRO-2 with LoRA on 2 ranks, every round on policy: test_vllm_ranks.py.)"""
    zero3 = {"zero_stage": 3, "zero3_param_persistence_threshold": 0}
    hist = run_two_ranks(grpo_settings(tiny_model_dir, "all-linear", precision="fp32", max_steps=4, **zero3),
                         tmp_path / "zero3", skip_sync=3)
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    gaps = [h["sampling/sampling_logp_difference/max"] for h in hist]
    assert all(gap < 1e-4 for gap in gaps[:3]), gaps  # the engines' first weights, and the two syncs after them
    assert all(h["rollout/sync_s"] > 0 for h in hist[:2]) and hist[3]["rollout/sync_s"] == 0
    assert all(h["grad_norm"] > 0 for h in hist[:3])
    assert gaps[3] > 1e-2  # round 4 sampled from the weights before step 3
