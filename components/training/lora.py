"""LoRA and QLoRA through peft, in one place: applying the `lora` part of a training stage's config
(components.training.config.Adapter: sft, dpo, grpo and ppo's actor) and what the engine asks of an adapted model.

With `lora.enabled` the policy is the base model, frozen, with low-rank adapters on `target_modules`, and only the
adapters train; with `lora.quantize` (QLoRA) the frozen base is loaded in 4 or 8 bits (bitsandbytes, CUDA only).
Each stage loads its policy with `load_policy` (given its `loading`, what loads a model directory) and saves it
with `save_policy`: the one place LoRA is applied.

- The reference of DPO, of SFT-KL and of GRPO's and PPO's KL term is then the base model with the adapter disabled
  (`base_reference`, peft's `disable_adapter()`) unless `ref_model` names another model: no second model is loaded.
- The stage's model/ is, by `output`, the merged model (the base with the adapter merged in: a plain Hugging Face
  directory, safetensors) or the adapter (peft's adapter directory, adapter_config.json and
  adapter_model.safetensors, with the tokenizer). summary.json records which (`output`: full, merged or
  adapter) and the trainable and total parameter counts.
- The vllm rollout engine (components/training/engines.py) holds the base with the adapters merged in: each sync
  pushes `merged_weights`, computed beside the trainer's weights, so the adapters go on training unmerged.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from components.config import UserError
from components.training import distributed
from components.training.config import Adapter, bf16_autocast

log = logging.getLogger(__name__)


def is_lora(model) -> bool:
    """Whether `model` is a peft model (LoRA adapters on a frozen base). peft is only looked at once loaded."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


@contextmanager
def base_reference(model):
    """Within it, `model` (a LoRA policy) computes as its base model: the adapter disabled (peft's
    `disable_adapter()`), in eval mode, without gradients; the policy's mode is restored after. This is the
    reference of DPO, SFT-KL and GRPO's KL term with LoRA, so no second model is loaded."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


def merged_weights(model, *, everything: bool = False):
    """(name, tensor) of a LoRA policy's weights as its base model's checkpoint names them (no peft prefixes),
    each adapted linear layer's weight W + scale·B·A computed beside it: nothing is merged in place, so the
    adapters go on training. What the vllm rollout engine syncs, one module at a time (a generator).

    Only the modules that hold an adapted layer (an attention or MLP block) are yielded, every weight of them,
    since the engine fuses their projections (q, k and v; gate and up) and a fused layer reloads whole; the
    frozen rest (embeddings, norms, the head) has not changed since the engine started. `everything`: every
    weight, as the engine starts. ZeRO-3 partitioned, each module's shards are gathered while it is read (every
    rank must iterate in step: the gathers are collectives); a quantized (QLoRA) base cannot be merged here."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    modules = dict(base.named_modules())
    adapted = {name for name, module in modules.items() if isinstance(module, LoraLayer)}
    owners: dict[str, list[str]] = {}  # a module -> its children with weights of their own (or adapted)
    for name, module in modules.items():
        parts = name.split(".")
        if any(".".join(parts[:i]) in adapted for i in range(1, len(parts))):
            continue  # an adapter's own parts (base_layer, lora_A, lora_B): read through their LoraLayer
        if name in adapted or next(module.parameters(recurse=False), None) is not None:
            owners.setdefault(name.rpartition(".")[0], []).append(name)
    wanted = {name.rpartition(".")[0] for name in adapted}
    for owner, names in owners.items():
        if not (everything or owner in wanted):
            continue
        params = [param for name in names for param in modules[name].parameters()]
        with _gathered(params):
            for name in names:
                module = modules[name]
                if name not in adapted:
                    yield from ((f"{name}.{key}", param.detach()) for key, param in module.named_parameters(
                        recurse=False))
                    continue
                with torch.no_grad():
                    weight = module.base_layer.weight
                    if not module.disable_adapters:
                        for adapter in module.active_adapters:
                            if adapter in module.lora_A:
                                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
                yield f"{name}.weight", weight.detach()
                if module.base_layer.bias is not None:
                    yield f"{name}.bias", module.base_layer.bias.detach()


def _gathered(params):
    """ZeRO-3 partitioned parameters gathered whole within it (every rank takes part); else nothing to do."""
    if not any(hasattr(param, "ds_id") for param in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class QuantizationUnavailable(UserError):
    """QLoRA was asked for where bitsandbytes cannot run."""


def check_quantization(quantize: str, device: torch.device) -> None:
    """QLoRA needs a CUDA device and bitsandbytes: elsewhere a one-line error naming the setting."""
    if quantize == "none":
        return
    missing = [what for what, ok in (("a CUDA device", device.type == "cuda"),
                                     ("bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
    if missing:
        raise QuantizationUnavailable(f"lora.quantize={quantize!r}: QLoRA needs a CUDA device with bitsandbytes, and "
                                      f"this machine has no {' and no '.join(missing)}; set lora.quantize: none "
                                      "(plain LoRA) or run on the GPU image")


def _quantization_config(quantize: str):
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters: peft's own count for an adapted model (a 4-bit weight counted unpacked),
    else the model's parameters (ZeRO-3's partitioned ones at their full size)."""
    if is_lora(model):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for param in model.parameters():
        count = param.numel() or getattr(param, "ds_numel", 0)
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def policy_dtype(lora: Adapter, train, device: torch.device) -> torch.dtype:
    """The dtype the policy's weights load in: a LoRA policy's frozen base in bf16 when the stage computes in
    bf16 (train.precision bf16-mixed, or auto on a GPU: its matmuls run in bf16 anyway, and fp32 would double
    the memory of weights that never change); the trained weights (a full policy, the adapters) in fp32."""
    return torch.bfloat16 if lora.enabled and train is not None and bf16_autocast(train, device) else torch.float32


def load_policy(path: str | Path, loading, lora: Adapter, seed: int = 0, train=None):
    """The model a training stage trains: the model at `path` as is, or with lora.enabled that model frozen
    (quantized with lora.quantize) under peft's LoRA adapters, which alone train; their random initialization
    comes from `seed` (the stage's train.seed), so a rerun starts from the same adapters. Logs the parameter
    counts.

    `train` (the stage's TrainConfig) decides how the weights load: in bf16 for a LoRA base that computes in bf16
    (`policy_dtype`), and under ZeRO-3 on several ranks partitioned as they load (distributed.sharded_loading),
    each rank holding its share. Without it, the model loads whole in fp32. `loading` loads a model directory (the
    stage's `loading` part: load_model(path, dtype=, device=, quantization_config=))."""
    dist = distributed.init()
    dtype = policy_dtype(lora, train, dist.device)
    sharded = distributed.sharded_loading(train, dist, dtype) if train is not None else nullcontext()
    if not lora.enabled:
        with sharded:
            model = loading.load_model(path)
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if lora.quantize != "none":
            device = dist.device
            check_quantization(lora.quantize, device)
            model = loading.load_model(path, dtype=torch.bfloat16, device=device,
                                       quantization_config=_quantization_config(lora.quantize))
            # norms in fp32, inputs that carry gradients; the engine chunks the head itself, so no checkpointing
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            with sharded:
                model = loading.load_model(path, dtype=dtype)
        with torch.random.fork_rng():  # the global RNG stays as it was: no other draw changes
            torch.manual_seed(seed)
            model = get_peft_model(model, lora.peft_config())
    trainable, total = parameter_counts(model)
    log.info("%s: %d of %d parameters train (%.2f%%)%s%s", path, trainable, total, 100 * trainable / max(total, 1),
             f", LoRA r={lora.r}" + (f" on the {lora.quantize} base" if lora.quantize != "none"
                                     else f" on the {str(dtype).removeprefix('torch.')} base")
             if lora.enabled else "",
             ", partitioned over the ranks as it loaded (ZeRO-3)" if distributed.is_partitioned(model) else "")
    return model


def merged_dtype(model, lora: Adapter) -> torch.dtype:
    """The dtype a LoRA policy's merged model is written in: that of its frozen base as it trained (bf16 or fp32),
    so a bf16 base is not written twice its size; a QLoRA base (4 or 8 bits) merges into fp32."""
    if lora.quantize != "none":
        return torch.float32
    return next((param.dtype for param in model.parameters() if not param.requires_grad), torch.float32)


def save_policy(model, tokenizer, path: Path, dist, lora: Adapter, base: str | Path, loading) -> dict:
    """Save the trained policy to `path` and return what summary.json records of it: `output` (full, merged or
    adapter), `trainable_params` and `total_params`.

    An adapted policy's adapter is gathered (ZeRO-3) and saved by rank 0; `merged` then loads the base again,
    unquantized, on the CPU, in the dtype the base trained in (`merged_dtype`), merges the adapter into it and
    saves that: a plain Hugging Face directory, the same whether the training base was quantized or sharded."""
    trainable, total = parameter_counts(model)
    counts = {"trainable_params": trainable, "total_params": total}
    if not is_lora(model):
        distributed.save_model(model, tokenizer, path, dist)
        return {"output": "full", **counts}
    merge = lora.output == "merged"
    scratch = Path(tempfile.mkdtemp(prefix=".adapter-", dir=Path(path).parent)) if merge and dist.rank == 0 else None
    adapter_dir = scratch or Path(path)
    if dist.world > 1:
        import deepspeed

        trained = [param for param in model.parameters() if param.requires_grad]
        with deepspeed.zero.GatheredParameters(trained, modifier_rank=None):
            if dist.rank == 0:
                model.save_pretrained(adapter_dir, safe_serialization=True)
    else:
        model.save_pretrained(adapter_dir, safe_serialization=True)
    if dist.rank == 0:
        if merge:
            from peft import PeftModel

            base_model = loading.load_model(base, dtype=merged_dtype(model, lora))
            merged = PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()
            merged.save_pretrained(path, safe_serialization=True)
            shutil.rmtree(scratch)
        tokenizer.save_pretrained(path)
    dist.barrier()
    return {"output": lora.output, **counts}
