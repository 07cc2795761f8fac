"""The rollout engines' parts that need no vLLM: the deadline of a weight sync, the config part, the hf engine."""
import os
import threading
import time

import pytest

from components.config import ConfigError, from_mapping
from components.training.config import RolloutEngine
from components.training.engines import EngineSyncError, HFEngine, run_with_deadline


def test_a_hung_call_raises_after_the_timeout():
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(EngineSyncError, match="did not finish within 0.2 s"):
        run_with_deadline(lambda: release.wait(30), 0.2, "rollout weight sync")
    assert time.monotonic() - started < 5
    release.set()


def test_a_failing_call_raises_with_its_cause():
    def fail():
        raise ValueError("shape mismatch")

    with pytest.raises(EngineSyncError, match="rollout weight sync failed: ValueError: shape mismatch") as info:
        run_with_deadline(fail, 5, "rollout weight sync")
    assert isinstance(info.value.__cause__, ValueError)
    assert run_with_deadline(lambda: 7, 5, "x") == 7


def test_the_rollout_part_is_checked():
    assert from_mapping(RolloutEngine, {}).engine == "hf"
    with pytest.raises(ConfigError, match="engine: 'sglang' is invalid: one of hf, vllm"):
        from_mapping(RolloutEngine, {"engine": "sglang"})
    with pytest.raises(ConfigError, match="sync_timeout_s: 0.0 is invalid"):
        from_mapping(RolloutEngine, {"sync_timeout_s": 0})
    with pytest.raises(ConfigError, match="gpu_memory_utilization: 1.5 is invalid"):
        from_mapping(RolloutEngine, {"gpu_memory_utilization": 1.5})


def test_the_hf_engine_is_the_sampler_on_the_model(tiny_model_dir):
    from components.models import load_model, load_tokenizer
    from components.training.rollout import generate

    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    engine = RolloutEngine().build(model, tok)
    assert isinstance(engine, HFEngine)
    ours = engine.generate(["1+2="], n=3, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=3, batch_size=4)
    direct = generate(model, tok, ["1+2="], n=3, max_new_tokens=6, seed=3, batch_size=4)
    assert ours.completion_ids == direct.completion_ids and ours.texts == direct.texts


def test_an_engine_folder_left_by_a_killed_process_is_removed_and_a_live_ones_kept(tmp_path):
    """A kill -9'd vllm run leaves its /dev/shm folder; the next engine on the machine removes it."""
    import subprocess

    from components.training.engines import ENGINE_DIR_PREFIX, remove_orphan_dirs

    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = tmp_path / f"{ENGINE_DIR_PREFIX}{gone.pid}-abc"
    live = tmp_path / f"{ENGINE_DIR_PREFIX}{os.getpid()}-def"
    other = tmp_path / "posttrain-vllm-notapid"
    for path in (orphan, live, other):
        path.mkdir()
        (path / "config.json").write_text("{}")
    remove_orphan_dirs(tmp_path)
    assert not orphan.exists()
    assert live.exists() and other.exists()
