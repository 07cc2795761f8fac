import pytest
import torch

from components.models import load_model, load_tokenizer
from components.training.batching import Example, micro_batches
from components.training.loop import forward_logprobs
from components.training.rollout import generate


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    torch.manual_seed(0)
    model = load_model(tiny_model_dir)
    with torch.no_grad():  # a random-init tiny model is nearly uniform: sharpen it so sampling is not trivial
        for p in model.parameters():
            p.mul_(3.0)
    return model, load_tokenizer(tiny_model_dir)


PROMPTS = ["12+7=", "Say something", "99-45=", "a"]


@pytest.mark.parametrize("temperature, checkpoint_defaults", [(1.0, False), (0.7, False), (0.0, False), (1.0, True)])
def test_rollout_logprobs_equal_teacher_forced(model_tok, temperature, checkpoint_defaults, monkeypatch):
    model, tok = model_tok
    if checkpoint_defaults:  # a checkpoint's generation_config.json (Qwen2.5-Instruct ships one) plays no part
        for key, value in {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "top_k": 5,
                           "temperature": 0.2}.items():
            monkeypatch.setattr(model.generation_config, key, value)
    ro = generate(model, tok, PROMPTS, n=3, temperature=temperature, max_new_tokens=12, seed=1, batch_size=5)
    assert len(ro) == 12 and ro.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    examples = [Example(p + c, len(p)) for p, c in zip(ro.prompt_ids, ro.completion_ids)]
    [mb] = micro_batches(examples, 10_000, tok.pad_token_id, single_row=True)
    with torch.no_grad():
        logp, _ = forward_logprobs(model, mb, 64, autocast=False, temperature=temperature or 1.0)
    worst = 0.0
    for i, (ex, lp) in enumerate(zip(examples, ro.logprobs)):
        sel = (mb.seq_index == i) & (mb.loss_mask > 0)
        assert lp.shape == (len(ex) - ex.completion_start,)
        worst = max(worst, float((logp[sel] - lp).abs().max()))
    assert worst <= 1e-4


def test_rollout_is_seeded_and_stops_at_eos(model_tok):
    model, tok = model_tok
    a = generate(model, tok, PROMPTS, n=4, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    b = generate(model, tok, PROMPTS, n=4, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=3)
    c = generate(model, tok, PROMPTS, n=4, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=4)
    assert a.completion_ids == b.completion_ids and a.texts == b.texts
    assert a.completion_ids != c.completion_ids
    for ids, fin in zip(a.completion_ids, a.finished):
        assert 1 <= len(ids) <= 10
        assert (ids[-1] == tok.eos_token_id) == fin and tok.eos_token_id not in ids[:-1]


def test_greedy_is_argmax_and_top_p_truncates(model_tok):
    model, tok = model_tok
    g1 = generate(model, tok, PROMPTS, n=2, temperature=0.0, max_new_tokens=6, seed=0)
    g2 = generate(model, tok, PROMPTS, n=1, temperature=0.0, max_new_tokens=6, seed=9)
    assert g1.completion_ids[::2] == g2.completion_ids
    # top_p → 0 keeps only the most likely token: the same as greedy
    tiny_p = generate(model, tok, PROMPTS, n=1, temperature=1.0, top_p=1e-6, max_new_tokens=6, seed=5)
    assert tiny_p.completion_ids == g2.completion_ids


def test_bad_sampling_settings(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, PROMPTS, top_p=0.0)
