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


def test_a_vllm_shm_segment_no_process_maps_is_removed_and_a_mapped_or_new_one_kept(tmp_path):
    """vLLM's CPU communicator creates its segments with O_EXCL under a name that is the same for every torchrun
    run (vllm csrc/cpu/shm.cpp, SHMManager::init_shm), so one left by a killed run would refuse the next engine."""
    import subprocess
    import sys
    import time

    from components.training.engines import SHM_SUFFIX, remove_orphan_shm

    mapped, orphan, new = (tmp_path / f"-tp:0-[0-1]{SHM_SUFFIX}{i}" for i in (0, 1, 2))
    for path in (mapped, orphan, new):
        path.write_bytes(bytes(4096))
    old = time.time() - 60
    for path in (mapped, orphan):
        os.utime(path, (old, old))
    holder = subprocess.Popen([sys.executable, "-c", "import mmap, sys; f = open(sys.argv[1], 'r+b'); "
                               "m = mmap.mmap(f.fileno(), 0); print('mapped', flush=True); sys.stdin.read()",
                               str(mapped)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        remove_orphan_shm(tmp_path)
        assert mapped.exists() and new.exists() and not orphan.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    remove_orphan_shm(tmp_path)  # its holder gone, the mapped one is an orphan too
    assert not mapped.exists() and new.exists()
