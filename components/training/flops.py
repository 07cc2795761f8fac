"""FLOP counts and model FLOP utilization (MFU).

Training FLOPs per sequence of n tokens: 6·P·n for the matrix multiplications (P = weights of every
linear layer, the language-model head included, tied or not) plus 6·L·H·n² for causal attention (forward
and backward of QKᵀ and AV over the causal half only: full attention would be 12·L·H·n²; the peer benchmark
counts it the same way). P is counted from the full weights, also when ZeRO-3 has partitioned them.
"""

from __future__ import annotations

import os

import torch

# Dense bf16 peak of the accelerators people train on, in FLOP/s (no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def matmul_params(model: torch.nn.Module) -> int:
    # ZeRO-3 leaves each rank an empty placeholder; DeepSpeed keeps the full size in ds_numel
    return sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def training_flops(model: torch.nn.Module, seq_lengths: list[int]) -> float:
    cfg = model.config
    p = matmul_params(model)
    attn = 6 * cfg.num_hidden_layers * cfg.hidden_size
    return float(sum(6 * p * n + attn * n * n for n in seq_lengths))


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s: PEAK_TFLOPS from the environment, else a known GPU's bf16 peak, else None."""
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16.items():
            if key in name:
                return value
    return None
