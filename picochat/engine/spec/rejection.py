"""The rejection sampler: verifies a request's draft tokens against the target model's logits.

Given the target's k + 1 logits rows for a request with k drafts (row j scores the token after
the j-th draft), it returns the accepted drafts plus one token from the target (1..k+1 tokens),
so the output follows exactly the distribution non-speculative sampling draws from. Row j is
processed as if the first j drafts were already in the output (penalties see them), through
``sampling.probs`` — the sampler's own distribution. Greedy rows accept the drafts that equal
their argmax. Every random draw uses the request's generator. Knows nothing about proposers,
requests or the model: a draft model passes the distributions it drew from (``draft_probs``),
the n-gram proposer passes None (its drafts are certain: q is one-hot).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from picochat.engine import sampling
from picochat.engine.sampling import SamplingRow


def verify(target_logits: Tensor, draft_token_ids: Sequence[int], draft_probs: Tensor | None,
           row: SamplingRow) -> list[int]:
    """target_logits [k+1, V], draft_probs [k, V] or None → the accepted drafts plus one token."""
    return verify_batch(target_logits, [draft_token_ids], [draft_probs], [row])[0]


def verify_batch(target_logits: Tensor, draft_token_ids: Sequence[Sequence[int]],
                 draft_probs: Sequence[Tensor | None], rows: Sequence[SamplingRow]) -> list[list[int]]:
    """target_logits [sum(k_r + 1), V], request r's rows consecutive → each request's tokens.

    One ``sampling`` call for all greedy requests and one for all sampled ones.
    """
    positions = [position_rows(row, drafts) for row, drafts in zip(rows, draft_token_ids)]
    sizes = [len(rows_r) for rows_r in positions]
    starts = list(itertools.accumulate(sizes, initial=0))
    assert target_logits.shape[0] == starts[-1], (tuple(target_logits.shape), starts[-1])
    tokens: list[list[int]] = [[] for _ in rows]

    def logits_and_rows(requests: list[int]) -> tuple[Tensor, list[SamplingRow]]:
        index = [i for r in requests for i in range(starts[r], starts[r + 1])]
        return _take(target_logits, index), [pos for r in requests for pos in positions[r]]

    greedy = [r for r, row in enumerate(rows) if row.greedy]
    sampled = [r for r, row in enumerate(rows) if not row.greedy]
    if greedy:
        targets = iter(sampling.sample(*logits_and_rows(greedy)).tolist())
        for r in greedy:
            tokens[r] = _accept_greedy(draft_token_ids[r], [next(targets) for _ in range(sizes[r])])
    if sampled:
        p = sampling.probs(*logits_and_rows(sampled))
        results = _verify_sampled(p.split([sizes[r] for r in sampled]),
                                  [draft_token_ids[r] for r in sampled], [draft_probs[r] for r in sampled],
                                  [rows[r].generator for r in sampled])
        for r, result in zip(sampled, results):
            tokens[r] = result
    return tokens


def position_rows(row: SamplingRow, draft_token_ids: Sequence[int]) -> list[SamplingRow]:
    """The sampling row of each of the k + 1 verified positions: position j has the first j drafts
    in its output, as the non-speculative sampler would when it got there."""
    output = list(row.output_token_ids)
    return [SamplingRow(row.params, row.prompt_token_ids, output + list(draft_token_ids[:j]), row.generator)
            for j in range(len(draft_token_ids) + 1)]


def _accept_greedy(drafts: Sequence[int], targets: list[int]) -> list[int]:
    """The drafts that equal the target's argmax, then the target's token at the first mismatch."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return [*drafts[:accepted], targets[accepted]]


def _verify_sampled(p: Sequence[Tensor], drafts: Sequence[Sequence[int]], q: Sequence[Tensor | None],
                    generators: Sequence[torch.Generator | None]) -> list[list[int]]:
    """Per request: p [k+1, V] the target's distributions, q [k, V] the draft's (None: one-hot)."""
    accepts: list[Tensor] = []
    for p_r, drafts_r, q_r, generator in zip(p, drafts, q, generators):
        k = len(drafts_r)
        x = torch.tensor(drafts_r, dtype=torch.int64, device=p_r.device)
        p_x = p_r[:k].gather(1, x.unsqueeze(1)).squeeze(1)
        q_x = torch.ones_like(p_x) if q_r is None else q_r.to(p_r.device).gather(1, x.unsqueeze(1)).squeeze(1)
        # Accept draft x with probability min(1, p(x) / q(x)): what the draft over-proposes is thinned to p.
        # On rejection draw from normalize(max(0, p - q)): exactly the mass the draft under-proposed.
        # So P(x) = q(x)·min(1, p(x)/q(x)) + (1 - Σ min(p, q))·max(0, p(x) - q(x)) / Σ max(0, p - q) = p(x).
        accepts.append(_uniform(k, generator, p_r.device) * q_x < p_x)
    accepted_flags = torch.cat(accepts).tolist() if accepts else []  # one device sync for the batch
    results: list[list[int]] = []
    finals: list[Tensor] = []
    flags = iter(accepted_flags)
    for p_r, drafts_r, q_r in zip(p, drafts, q):
        request_flags = [next(flags) for _ in drafts_r]
        accepted = request_flags.index(False) if False in request_flags else len(drafts_r)
        results.append(list(drafts_r[:accepted]))
        if accepted == len(drafts_r):
            finals.append(p_r[accepted])  # all accepted: the bonus token from the next position
        else:
            finals.append(_residual(p_r[accepted], None if q_r is None else q_r[accepted].to(p_r.device),
                                    drafts_r[accepted]))
    last = sampling.sample_from_probs(torch.stack(finals), generators).tolist()
    return [result + [token] for result, token in zip(results, last)]


def _residual(p: Tensor, q: Tensor | None, rejected: int) -> Tensor:
    """[V] max(0, p - q), unnormalised (q None: one-hot at the rejected draft, so p without it).

    Falls back to p when rounding leaves no mass (a rejection needs p(x) < q(x), so in exact
    arithmetic some mass is always left)."""
    if q is None:
        residual = p.clone()
        residual[rejected] = 0.0
    else:
        residual = (p - q).clamp_(min=0.0)
    return torch.where(residual.sum() > 0, residual, p)


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """[n] uniforms in [0, 1) from the request's generator (None: the global RNG of ``device``)."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _take(t: Tensor, index: list[int]) -> Tensor:
    """t[index], or t itself when index covers every row in order."""
    return t if len(index) == t.shape[0] else t[torch.tensor(index, dtype=torch.int64, device=t.device)]
