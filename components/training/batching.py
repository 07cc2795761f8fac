"""Batching: chat templates, completion-only loss masks, and packing into token-budget micro-batches.

A training example is a prompt and a completion turned into token ids. Only completion tokens are
trained (the loss mask is 0 on the prompt). Examples are packed into rows of a micro-batch, up to
`token_budget` tokens, with position ids restarting at 0 for every sequence. Transformers derives the
document mask from those position ids (sdpa, eager and flex attention build a block-diagonal causal
mask; flash-attention runs varlen), so attention never crosses a sequence boundary. Padding continues
the last sequence's positions, so a row that holds one sequence has no restart: it runs as plain causal
attention, with no mask at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from components.templates import render_prompt_completion


@dataclass(slots=True)
class Example:
    """One tokenized sequence: `input_ids[completion_start:]` is the completion to train on."""
    input_ids: list[int]
    completion_start: int
    source: str = ""  # "file:line" of the row it came from, for error messages

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_example(tokenizer, prompt, completion: str, source: str = "") -> Example:
    """Tokenize prompt and completion separately, so no token ever straddles the boundary."""
    prompt_text, completion_text = render_prompt_completion(tokenizer, prompt, completion)
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    return Example(input_ids=p + c, completion_start=len(p), source=source)


def pack_sequences(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices into bins of at most `token_budget` tokens (first-fit decreasing).

    Deterministic for given lengths. A sequence longer than the budget gets a bin of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(token_budget - n)
    for b in bins:
        b.sort()
    return bins


@dataclass(slots=True)
class PackedBatch:
    """One micro-batch: rows of packed sequences (shape [R, T]).

    `targets[t]` is the token that position t predicts; `loss_mask[t]` is 1 where that target is a
    completion token of the same sequence; `seq_index[t]` is the index (in the step's list of examples)
    of the sequence position t belongs to, −1 on padding.
    """
    input_ids: Tensor
    position_ids: Tensor
    targets: Tensor
    loss_mask: Tensor
    seq_index: Tensor

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(getattr(self, f).to(device, non_blocking=True) for f in self.__slots__))

    @property
    def num_tokens(self) -> int:
        return int((self.seq_index >= 0).sum())


def collate_packed(examples: list[Example], rows: list[list[int]], pad_id: int, width: int) -> PackedBatch:
    """Lay out `rows` (lists of example indices, each fitting in `width` tokens) as a [len(rows), width] batch."""
    cols = {name: [] for name in ("ids", "pos", "tgt", "mask", "seq")}
    for row in rows:
        ids, pos, tgt, mask, seq = [], [], [], [], []
        for i in row:
            ex = examples[i]
            n = len(ex.input_ids)
            ids += ex.input_ids
            pos += range(n)
            tgt += ex.input_ids[1:] + [pad_id]
            # position t predicts token t+1: trained when t+1 is a completion token of this sequence
            mask += [1.0 if ex.completion_start <= t + 1 < n else 0.0 for t in range(n)]
            seq += [i] * n
        pad = width - len(ids)
        if pad < 0:
            raise ValueError(f"row of {len(ids)} tokens does not fit in width {width}")
        # padding continues the last sequence's positions (a one-sequence row stays plain causal); it comes after
        # every real token, so nothing attends to it, and nothing trains on it
        after = pos[-1] + 1 if pos else 0
        for name, values, fill in (("ids", ids, [pad_id] * pad), ("pos", pos, range(after, after + pad)),
                                   ("tgt", tgt, [pad_id] * pad),
                                   ("mask", mask, [0.0] * pad), ("seq", seq, [-1] * pad)):
            cols[name].append(list(values) + list(fill))
    as_t = lambda k, dt: torch.tensor(cols[k], dtype=dt)  # noqa: E731
    return PackedBatch(as_t("ids", torch.long), as_t("pos", torch.long), as_t("tgt", torch.long),
                       as_t("mask", torch.float32), as_t("seq", torch.long))


def pair_groups(num_examples: int) -> list[list[int]]:
    """Groups for `micro_batches` of examples in (chosen, rejected) order: each pair shares a micro-batch, so one
    micro-batch's loss couples them (DPO, the reward model)."""
    return [[chosen, chosen + 1] for chosen in range(0, num_examples, 2)]


def micro_batches(examples: list[Example], token_budget: int, pad_id: int, *, single_row: bool = False,
                  multiple: int = 8, groups: list[list[int]] | None = None) -> list[PackedBatch]:
    """Pack a step's examples into micro-batches of at most `token_budget` tokens each.

    groups: lists of example indices that must share a micro-batch (DPO's chosen and rejected, whose loss couples
    them); by default every example is a group of its own.

    single_row: one packed row per micro-batch (for varlen kernels such as flash-attention, whose cost is
    Σ n² whatever the row); a group then shares the row. Otherwise rows are as wide as the longest sequence
    (rounded up to `multiple`) and a micro-batch holds about token_budget // width of them: kernels that apply a
    dense causal or block-diagonal mask (sdpa, eager) then pay width² per row instead of token_budget² for one
    long row, and a group's sequences get rows of their own when they do not fit one together (a DPO pair is
    two rows of n², not one of (2n)²).
    """
    groups = groups if groups is not None else [[i] for i in range(len(examples))]
    lengths = [sum(len(examples[i]) for i in g) for g in groups]
    if not lengths:
        return []
    round_up = lambda n: -(-n // multiple) * multiple  # noqa: E731
    expand = lambda bins: [[i for b in bin_ for i in groups[b]] for bin_ in bins]  # noqa: E731
    if single_row:
        return [collate_packed(examples, [row], pad_id, round_up(sum(len(examples[i]) for i in row)))
                for row in expand(pack_sequences(lengths, token_budget))]
    width = round_up(max(len(example) for example in examples))
    if all(len(g) == 1 for g in groups):  # rows first, then as many rows per micro-batch as the budget holds
        rows = expand(pack_sequences(lengths, width))
        per_batch = max(1, token_budget // width)
        return [collate_packed(examples, rows[i:i + per_batch], pad_id, width)
                for i in range(0, len(rows), per_batch)]
    # groups first, into micro-batches of about token_budget tokens, then each micro-batch's sequences into rows
    out = []
    for members in expand(pack_sequences(lengths, max(token_budget, width))):
        rows = pack_sequences([len(examples[i]) for i in members], width)
        out.append(collate_packed(examples, [[members[i] for i in row] for row in rows], pad_id, width))
    return out


def sequence_sums(values: Tensor, batch: PackedBatch, num_seqs: int) -> Tensor:
    """Sum a per-token quantity (masked by the loss mask) per sequence: a [num_seqs] tensor."""
    idx = batch.seq_index.clamp(min=0).reshape(-1)
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, idx, (values * batch.loss_mask).reshape(-1))


def trained_sequences(batch: PackedBatch, num_seqs: int) -> Tensor:
    """A [num_seqs] bool mask: the sequences with trained tokens in this micro-batch."""
    present = torch.zeros(num_seqs, dtype=torch.bool, device=batch.seq_index.device)
    present[batch.seq_index[batch.loss_mask > 0].unique()] = True
    return present


def completion_values(batch: PackedBatch, examples: list[Example], values: list[Tensor]) -> Tensor:
    """Lay per-completion-token values (values[i][j]: the j-th completion token of examples[i], e.g. the
    rollout's log-probs) out like `batch.targets`; 0 where the loss mask is 0."""
    starts, flat, offset = [], [], 0
    for ex, v in zip(examples, values):
        starts.append(offset - (ex.completion_start - 1))  # position p predicts token p+1
        flat.append(v.reshape(-1).float())
        offset += v.numel()
    flat_t = torch.cat(flat + [torch.zeros(1)]).to(batch.targets.device)
    start_t = torch.tensor(starts, dtype=torch.long, device=batch.targets.device)
    mask = batch.loss_mask > 0
    idx = torch.where(mask, start_t[batch.seq_index.clamp(min=0)] + batch.position_ids, offset)
    return flat_t[idx] * mask
