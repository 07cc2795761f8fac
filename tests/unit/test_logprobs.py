"""forward_logprobs: only trained positions go through the head; chunked, checkpointed or kept, the values and
gradients equal a plain full-logits log-softmax."""

import pytest
import torch

import components.training.logprobs as logprobs_module
from components.models import load_model
from components.training.batching import Example, micro_batches
from components.training.loop import forward_logprobs


@pytest.mark.parametrize("checkpoint_above", [0, 2**40])  # every chunk recomputed / every chunk kept
def test_trained_positions_only_equal_the_full_log_softmax(tiny_model_dir, checkpoint_above, monkeypatch):
    monkeypatch.setattr(logprobs_module, "CHECKPOINT_ABOVE_BYTES", checkpoint_above)
    torch.manual_seed(0)
    model = load_model(tiny_model_dir)
    examples = [Example(torch.randint(3, 60, (n,)).tolist(), n // 3) for n in (17, 9, 30, 5)]
    [batch] = micro_batches(examples, 4096, 0, single_row=True)

    logp, entropy = forward_logprobs(model, batch, chunk_size=7, autocast=False)
    (logp * batch.loss_mask).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits.float()
    full = torch.log_softmax(logits, -1)
    want = full.gather(-1, batch.targets[..., None]).squeeze(-1) * batch.loss_mask
    (want * batch.loss_mask).sum().backward()
    mask = batch.loss_mask > 0
    assert torch.allclose(logp, want, atol=1e-5)
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()
    assert torch.allclose(entropy[mask], -(full.exp() * full).sum(-1)[mask], atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)
