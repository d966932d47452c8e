"""The sampler: a batch of logits rows → next tokens, one SamplingParams per row (vLLM's definitions).

Per row, in order: penalties (repetition over prompt + output tokens, CTRL rule; presence and
frequency over output tokens only), then — for sampled rows — temperature, top-k, top-p and min-p
masks. Greedy rows (temperature below 1e-5, vLLM's epsilon) take the argmax of their penalised
logits. ``probs`` returns exactly the distribution ``sample`` draws from, which is what speculative
decoding's rejection sampler needs. Each stage is skipped when no row uses it, so an all-greedy
batch without penalties costs one ``torch.max``. Seeded rows draw from their own generator, so a
seeded request gives the same tokens whatever else is in the batch. This module knows nothing
about requests, the scheduler or the model.
"""

from __future__ import annotations

import array
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from picochat.config import SamplingParams

GREEDY_TEMPERATURE = 1e-5  # vLLM's epsilon: a smaller temperature means greedy
# Top-p first looks for its cut among the row's largest logits: topk(256) of 49,152 logits takes
# ~0.25 ms on this CPU, a full sort ~5 ms. Rows whose candidates hold less than top_p fall back
# to the full sort; both give the same cut.
TOP_P_CANDIDATES = 256


@dataclass(frozen=True)
class SamplingRow:
    """One logits row's sampling inputs."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far (the engine appends to it)
    generator: torch.Generator | None  # per request, from make_generator(params.seed); None → global RNG
    # (any device: its draws are moved to the logits' device)

    @property
    def greedy(self) -> bool:
        return self.params.temperature < GREEDY_TEMPERATURE


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A request's private RNG (None for an unseeded request, which uses the global RNG)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def process_logits(logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """[B, V] logits → [B, V] fp32 processed logits (a new tensor; the input is not modified).

    A sampled row's softmax is the distribution ``sample`` draws from (masked tokens are -inf);
    a greedy row holds its penalised logits, whose argmax is its token.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
    out = logits.to(torch.float32, copy=True)
    _apply_penalties(out, rows)
    sampled = [i for i, row in enumerate(rows) if not row.greedy]
    if sampled:
        _update_rows(out, sampled, lambda sub: _temperature_and_masks(sub, [rows[i].params for i in sampled]))
    return out


def probs(logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """[B, V] the exact distribution ``sample`` draws from; a greedy row is one-hot at its argmax."""
    processed = process_logits(logits, rows)
    out = torch.zeros_like(processed)
    greedy = [i for i, row in enumerate(rows) if row.greedy]
    sampled = [i for i, row in enumerate(rows) if not row.greedy]
    if greedy:
        out[_index(greedy, out.device), _rows_of(processed, greedy).max(dim=-1).indices] = 1.0
    if sampled:
        out[_index(sampled, out.device)] = _rows_of(processed, sampled).softmax(dim=-1)
    return out


def sample(logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """[B, V] logits → [B] int64 next tokens."""
    if all(row.greedy and not _penalised(row.params) for row in rows):
        return logits.max(dim=-1).indices  # the fast path: no fp32 copy, no processing
    processed = process_logits(logits, rows)
    tokens = torch.empty(len(rows), dtype=torch.int64, device=logits.device)
    greedy = [i for i, row in enumerate(rows) if row.greedy]
    sampled = [i for i, row in enumerate(rows) if not row.greedy]
    if greedy:
        tokens[_index(greedy, tokens.device)] = _rows_of(processed, greedy).max(dim=-1).indices
    if sampled:
        p = _rows_of(processed, sampled).softmax(dim=-1)
        tokens[_index(sampled, tokens.device)] = sample_from_probs(p, [rows[i].generator for i in sampled])
    return tokens


def sample_from_probs(p: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """[N, V] probabilities (rows need not sum to 1) → [N] int64 tokens, by inverse CDF.

    One uniform per row: a row with a generator draws it from that generator, so its token does
    not depend on the other rows. A token of probability 0 is never drawn.
    """
    cdf = p.cumsum(dim=-1)  # [N, V]
    total = cdf[:, -1:]
    u = torch.empty_like(total)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        u.uniform_()
    else:
        if unseeded:
            u[_index(unseeded, u.device)] = torch.rand(len(unseeded), 1, device=u.device)
        for i, g in enumerate(generators):
            if g is not None:
                u[i] = torch.rand(1, generator=g, device=g.device).to(u.device)
    # u < total strictly, so the first index whose cdf exceeds it has a positive probability.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


# ---------------------------------------------------------------------------- penalties

def _penalised(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def _apply_penalties(logits: Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place, touching only the ids each row has seen (gather/scatter), never a dense [B, V] select."""
    device = logits.device
    repeat = [i for i, row in enumerate(rows)
              if row.params.repetition_penalty != 1.0 and (row.prompt_token_ids or row.output_token_ids)]
    if repeat:
        ids, _ = _padded_ids([(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in repeat], device)
        penalty = torch.tensor([rows[i].params.repetition_penalty for i in repeat], device=device).unsqueeze(1)

        def repetition(sub: Tensor) -> Tensor:  # CTRL: divide positive logits, multiply negative ones
            seen = sub.gather(1, ids)
            return sub.scatter_(1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))

        _update_rows(logits, repeat, repetition)
    additive = [i for i, row in enumerate(rows)
                if (row.params.presence_penalty or row.params.frequency_penalty) and row.output_token_ids]
    if additive:
        ids, lengths = _padded_ids([(rows[i].output_token_ids,) for i in additive], device)
        frequency = torch.tensor([rows[i].params.frequency_penalty for i in additive], device=device).unsqueeze(1)
        presence = torch.tensor([rows[i].params.presence_penalty for i in additive], device=device).unsqueeze(1)
        padding = torch.arange(ids.shape[1], device=device) >= lengths.unsqueeze(1)

        def presence_and_frequency(sub: Tensor) -> Tensor:
            penalty = torch.zeros_like(sub).scatter_(1, ids, presence.expand_as(ids))
            penalty.scatter_add_(1, ids, frequency.expand_as(ids).masked_fill(padding, 0.0))
            return sub.sub_(penalty)

        _update_rows(logits, additive, presence_and_frequency)


def _padded_ids(token_rows: Sequence[tuple[Sequence[int], ...]], device: torch.device) -> tuple[Tensor, Tensor]:
    """[N, L] int64 ids (each row's parts concatenated) and [N] lengths.

    A row is padded with its own first id, so a gather/scatter over the padding only repeats a
    seen token; each row must hold at least one id.
    """
    lengths = [sum(map(len, parts)) for parts in token_rows]
    width = max(lengths)
    flat = array.array("q")
    for parts, length in zip(token_rows, lengths):
        start = len(flat)
        for part in parts:
            flat.extend(part)
        flat.extend([flat[start]] * (width - length))
    ids = torch.frombuffer(flat, dtype=torch.int64).view(len(token_rows), width)
    return ids.to(device), torch.tensor(lengths, device=device)


# ---------------------------------------------------------------------------- temperature and masks

def _temperature_and_masks(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Sampled rows only: temperature, then top-k, top-p and min-p masks (in place)."""
    vocab, device = logits.shape[1], logits.device
    if any(p.temperature != 1.0 for p in params):
        logits.div_(torch.tensor([p.temperature for p in params], device=device).unsqueeze(1))
    top_k = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
    if top_k:
        ks = [params[i].top_k for i in top_k]
        _update_rows(logits, top_k, lambda sub: _mask_below(sub, _top_k_thresholds(sub, ks)))
    top_p = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if top_p:
        ps = torch.tensor([params[i].top_p for i in top_p], device=device).unsqueeze(1)
        _update_rows(logits, top_p, lambda sub: _mask_below(sub, _top_p_thresholds(sub, ps)))
    if any(p.min_p > 0.0 for p in params):
        # p_i >= min_p * p_max  ⇔  logit_i >= logit_max + log(min_p)
        log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params],
                                 device=device).unsqueeze(1)
        _mask_below(logits, logits.max(dim=-1, keepdim=True).values + log_min_p)
    return logits


def _mask_below(logits: Tensor, threshold: Tensor) -> Tensor:
    """-inf where a logit is below its row's [N, 1] threshold; ties with the threshold are kept."""
    return logits.masked_fill_(logits < threshold, -math.inf)


def _top_k_thresholds(logits: Tensor, ks: Sequence[int]) -> Tensor:
    """[N, 1] the k-th largest logit of each row (each k in 1..V-1)."""
    largest = logits.topk(max(ks), dim=-1).values  # [N, max k], descending
    return largest.gather(1, torch.tensor(ks, device=logits.device).unsqueeze(1) - 1)


def _top_p_thresholds(logits: Tensor, ps: Tensor) -> Tensor:
    """[N, 1] the logit of the token whose cumulative probability (largest first) reaches top_p.

    That token is kept; everything smaller is masked. ps: [N, 1], each in (0, 1).
    """
    log_total = logits.logsumexp(dim=-1, keepdim=True)  # earlier masks are already -inf
    candidates = logits.topk(min(TOP_P_CANDIDATES, logits.shape[1]), dim=-1).values
    threshold, found = _nucleus_cut(candidates, log_total, ps)
    if not found.all():
        missing = found.logical_not().squeeze(1).nonzero().squeeze(1)
        full = logits[missing].sort(dim=-1, descending=True).values
        threshold[missing] = _nucleus_cut(full, log_total[missing], ps[missing])[0]
    return threshold


def _nucleus_cut(descending: Tensor, log_total: Tensor, ps: Tensor) -> tuple[Tensor, Tensor]:
    """Among a row's largest logits (descending), the one crossing mass ps, and whether it is there."""
    cumulative = (descending - log_total).exp().cumsum(dim=-1)
    before = (cumulative < ps).sum(dim=-1, keepdim=True)  # tokens before the one that crosses
    found = before < descending.shape[1]
    # Not found in the full row only by rounding (the total mass a hair under ps): keep every token.
    return descending.gather(1, before.clamp(max=descending.shape[1] - 1)), found


# ---------------------------------------------------------------------------- row subsets

def _index(rows: Sequence[int], device: torch.device) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _rows_of(t: Tensor, rows: Sequence[int]) -> Tensor:
    """t[rows], or t itself when ``rows`` is the whole batch (no gather)."""
    return t if len(rows) == t.shape[0] else t[_index(rows, t.device)]


def _update_rows(logits: Tensor, rows: Sequence[int], fn: Callable[[Tensor], Tensor]) -> None:
    """logits[rows] = fn(logits[rows]); fn works in place and returns its argument (no gather for a whole batch)."""
    if len(rows) == logits.shape[0]:
        fn(logits)
    else:
        index = _index(rows, logits.device)
        logits[index] = fn(logits[index])
