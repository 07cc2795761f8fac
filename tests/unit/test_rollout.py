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


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_decode_loop_samples_what_hf_generate_samples(model_tok, temperature, top_p):
    # the decode loop and Hugging Face generate (the GPU path, here with its static cache on the CPU) draw the
    # same tokens from the same seed, with left-padded prompts of different lengths and rows that end early
    model, tok = model_tok
    kw = dict(n=4, temperature=temperature, top_p=top_p, max_new_tokens=40, seed=7, batch_size=5)
    loop = generate(model, tok, PROMPTS, cache="dynamic", **kw)
    hf = generate(model, tok, PROMPTS, cache="static", **kw)
    assert loop.completion_ids == hf.completion_ids and loop.finished == hf.finished
    assert temperature == 0 or any(loop.finished) and not all(loop.finished)
    for a, b in zip(loop.logprobs, hf.logprobs):
        assert torch.allclose(a, b, atol=1e-5)


def test_inverse_cdf_draws_follow_the_distribution_and_never_a_cut_token():
    from components.training.rollout import _choose

    torch.manual_seed(0)
    scores = torch.randn(4, 10) * 2
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 10)
    for _ in range(20000):
        choice, logp = _choose(scores, 1.0, 1.0, torch.rand(4, generator=g, dtype=torch.float64))
        counts[torch.arange(4), choice] += 1
    # 20000 draws: a frequency's standard error is ≤ 0.0036; 0.02 is > 5 of them
    assert (counts / 20000 - logp.exp()).abs().max() < 0.02
    probs = torch.softmax(scores, -1)
    kept = probs.sort(-1, descending=True).values.cumsum(-1) - probs.sort(-1, descending=True).values <= 0.5
    for u in (0.0, 0.999999999, *torch.rand(2000, generator=g, dtype=torch.float64).tolist()):
        choice, _ = _choose(scores, 1.0, 0.5, torch.full((4,), u, dtype=torch.float64))
        rank = (probs > probs.gather(-1, choice[:, None])).sum(-1)  # top_p 0.5: only the smallest prefix reaching
        assert kept.gather(-1, rank[:, None]).all()                   # 0.5 is ever drawn, even at the ends


def test_a_sample_does_not_depend_on_the_other_prompts_of_its_batch_or_call(model_tok):
    # what lets evaluate and reward_scoring split their prompts over processes: sample j of prompt i is seeded
    # from (seed, i, j) whatever else is decoded with it
    model, tok = model_tok
    kw = dict(n=3, temperature=1.0, max_new_tokens=10, seed=11)
    whole = generate(model, tok, PROMPTS, batch_size=12, **kw)
    split = [generate(model, tok, PROMPTS[i:i + 1], indices=[i], batch_size=2, **kw) for i in range(len(PROMPTS))]
    assert whole.completion_ids == [ids for part in split for ids in part.completion_ids]
    shuffled = generate(model, tok, PROMPTS[::-1], indices=[3, 2, 1, 0], batch_size=5, **kw)
    assert shuffled.completion_ids == [ids for part in split[::-1] for ids in part.completion_ids]


def test_per_prompt_seeds_do_not_depend_on_the_batch(model_tok):
    """With `indices`, a prompt's samples come from streams of their own (seed, prompt index, sample number):
    the same whichever prompts share the call or the batch, and still the sampler's log-probs."""
    model, tok = model_tok
    whole = generate(model, tok, PROMPTS, n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=3, batch_size=5,
                     indices=[0, 1, 2, 3])
    part = generate(model, tok, PROMPTS[2:], n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=3,
                    batch_size=2, indices=[2, 3])
    assert part.completion_ids == whole.completion_ids[6:] and part.texts == whole.texts[6:]
    for a, b in zip(part.logprobs, whole.logprobs[6:]):
        assert torch.allclose(a, b, atol=1e-5)
    assert len({tuple(c) for c in whole.completion_ids}) > 6  # the samples of a prompt differ from each other
    other = generate(model, tok, PROMPTS[2:], n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=3,
                     batch_size=2, indices=[7, 8])
    assert other.completion_ids != part.completion_ids  # the index, not the position in the call, seeds
    with pytest.raises(ValueError, match="indices: 1 given for 2 prompts"):
        generate(model, tok, PROMPTS[:2], n=1, indices=[0])
