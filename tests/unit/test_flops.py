"""FLOP counts: 6·P·n + 6·L·H·n² per sequence, with P the full linear weights also under ZeRO-3."""

import torch
from transformers import AutoModelForCausalLM

from components.models import tiny_config
from components.training.flops import matmul_params, training_flops


def test_training_flops_and_zero3_partitioned_weights():
    cfg = tiny_config(vocab_size=100)
    model = AutoModelForCausalLM.from_config(cfg)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    p = sum(m.weight.numel() for m in linears)  # the tied lm_head counts: it is a matmul of its own
    assert matmul_params(model) == p
    n = 37
    assert training_flops(model, [n, n]) == 2 * (6 * p * n + 6 * cfg.num_hidden_layers * cfg.hidden_size * n * n)

    # ZeRO-3 leaves an empty placeholder on each rank and the full size in ds_numel
    for m in linears:
        full = m.weight.numel()
        m.weight = torch.nn.Parameter(torch.empty(0))
        m.weight.ds_numel = full
    assert matmul_params(model) == p
