"""Packing: attention must not cross sequences, and packing must not change any sequence's loss."""

import random

import pytest
import torch

from components.models import load_model, load_tokenizer
from components.training.batching import (
    Example,
    collate_packed,
    encode_example,
    micro_batches,
    pack_sequences,
    pair_groups,
    sequence_sums,
)
from components.training.loop import forward_logprobs


def _examples(tok, n=12, seed=0):
    rng = random.Random(seed)
    return [encode_example(tok, f"{rng.randint(0, 99999)}+{rng.randint(0, 9)}=",
                           str(rng.randint(0, 10 ** rng.randint(1, 6))))
            for _ in range(n)]


@pytest.mark.parametrize("single_row", [False, True])
def test_packed_equals_unpacked_per_sequence(tiny_model_dir, single_row):
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval()
    exs = _examples(tok)
    # packed: all sequences in few rows
    packed = {}
    for mb in micro_batches(exs, 64, tok.pad_token_id, single_row=single_row):
        with torch.no_grad():
            lp, _ = forward_logprobs(model, mb, 16, autocast=False)
        sums = sequence_sums(lp, mb, len(exs))
        for i in set(mb.seq_index.flatten().tolist()) - {-1}:
            packed[i] = sums[i].item()
    # unpacked: a padded batch through the ordinary forward with an attention mask
    width = max(len(e) for e in exs)
    ids = torch.full((len(exs), width), tok.pad_token_id)
    att = torch.zeros(len(exs), width, dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, :len(e)] = torch.tensor(e.input_ids)
        att[i, :len(e)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    for i, e in enumerate(exs):
        ref = logp[i, e.completion_start - 1:len(e) - 1].sum().item()
        assert abs(packed[i] - ref) < 1e-5 * max(1.0, abs(ref)), (i, packed[i], ref)
    assert len(packed) == len(exs)


def test_pack_sequences_respects_budget_and_keeps_everything():
    lengths = [5, 9, 3, 7, 20, 1, 8]
    bins = pack_sequences(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 10 or len(b) == 1
    assert pack_sequences(lengths, 10) == bins  # deterministic


def test_collate_masks_only_completion_targets_within_a_sequence():
    exs = [Example([10, 11, 12, 13], 2), Example([20, 21, 22], 1)]
    b = collate_packed(exs, [[0, 1]], pad_id=0, width=8)
    assert b.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]  # padding continues the last sequence
    # position t predicts t+1: seq 0 trains targets 12, 13; seq 1 trains 21, 22; nothing across the boundary
    assert b.targets[0, :4].tolist() == [11, 12, 13, 0]
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]
    assert b.seq_index.tolist() == [[0, 0, 0, 0, 1, 1, 1, -1]]


def test_chat_template_completion_is_what_the_model_generates(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    e = encode_example(tok, "12+3=", "15")
    assert tok.decode(e.input_ids[:e.completion_start]) == "<|user|>12+3=<|end|><|assistant|>"
    assert tok.decode(e.input_ids[e.completion_start:]) == "15<|end|>"


def test_micro_batches_rows_fit_the_longest_sequence_and_the_budget():
    exs = [Example(list(range(3, 3 + n)), 1) for n in (5, 9, 3, 7, 12, 1, 8)]
    mbs = micro_batches(exs, 32, pad_id=0)
    assert all(mb.input_ids.shape[1] == 16 and mb.input_ids.numel() <= 32 for mb in mbs)
    seen = sorted(i for mb in mbs for i in set(mb.seq_index.flatten().tolist()) - {-1})
    assert seen == list(range(len(exs)))
    assert sum(mb.num_tokens for mb in mbs) == sum(len(e) for e in exs)
    (one,) = micro_batches(exs, 64, pad_id=0, single_row=True)
    assert one.input_ids.shape == (1, 48) and one.num_tokens == 45


def test_no_examples_make_no_micro_batches():
    # a rank whose shard of a step is empty (batch_size < world size) packs nothing
    assert micro_batches([], 64, pad_id=0) == []


def test_a_pair_shares_a_micro_batch_in_rows_of_single_sequences():
    # DPO's chosen and rejected: one micro-batch (their loss couples them), but each in a row of its own when the
    # two do not fit one, so attention costs 2·n² instead of (2n)²; a one-sequence row has no position restart
    exs = [Example(list(range(3, 3 + n)), 1) for n in (9, 7, 8, 8, 3, 2, 16, 5)]
    groups = pair_groups(len(exs))
    mbs = micro_batches(exs, 40, pad_id=0, groups=groups)
    assert all(mb.input_ids.shape[1] == 16 for mb in mbs)
    where = {i: b for b, mb in enumerate(mbs) for i in set(mb.seq_index.flatten().tolist()) - {-1}}
    assert sorted(where) == list(range(len(exs)))
    assert all(where[c] == where[r] for c, r in groups)
    assert sum(mb.num_tokens for mb in mbs) == sum(len(e) for e in exs)
    for mb in mbs:
        for row_pos, row_seq in zip(mb.position_ids.tolist(), mb.seq_index.tolist()):
            if len(set(row_seq) - {-1}) == 1:
                assert row_pos == list(range(len(row_pos)))
