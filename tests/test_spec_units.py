"""Speculative decoding's building blocks: the n-gram proposer, the rejection sampler, the adaptive k."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
import torch

from picochat.config import SamplingParams
from picochat.engine import sampling
from picochat.engine.sampling import SamplingRow, make_generator
from picochat.engine.spec.adaptive import AdaptiveK
from picochat.engine.spec.ngram import NgramIndex, propose_ngram
from picochat.engine.spec.rejection import verify, verify_batch



@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tensors are tiny, yet torch's CPU softmax wakes its thread pool for a 3x6 input,
    which costs milliseconds per call on a busy machine; one thread keeps the trials fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- n-gram proposer


def brute_force_proposal(tokens: Sequence[int], n: int, k: int, min_n: int = 1) -> list[int]:
    """The definition: the latest earlier occurrence of the longest tail n-gram; the text then
    continues as it did after it (reading back the continuation itself once it passes the end)."""
    length = len(tokens)
    for m in range(min(n, length), min_n - 1, -1):
        for end in range(length - 1, m - 1, -1):
            if list(tokens[end - m:end]) == list(tokens[length - m:]):
                extended = list(tokens)
                for i in range(k):
                    extended.append(extended[end + i])
                return extended[length:]
    return []


def test_ngram_proposes_what_followed_the_latest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    assert propose_ngram(tokens, n=3, k=1) == [7]
    assert propose_ngram(tokens, n=3, k=3) == [7, 5, 1]


def test_ngram_respects_k():
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert propose_ngram(tokens, n=2, k=2) == [3, 4]
    assert propose_ngram(tokens, n=2, k=0) == []


def test_ngram_falls_back_to_shorter_ngrams_down_to_min_n():
    tokens = [4, 2, 3, 8, 6, 1, 2, 3]  # the tail trigram never occurred; its bigram (2, 3) did
    assert propose_ngram(tokens, n=3, k=2) == [8, 6]
    assert propose_ngram(tokens, n=3, k=2, min_n=3) == []


def test_ngram_prefers_a_longer_match_to_a_more_recent_shorter_one():
    tokens = [1, 2, 3, 7, 9, 2, 3, 8, 1, 2, 3]
    assert propose_ngram(tokens, n=3, k=1) == [7]
    assert propose_ngram(tokens, n=2, k=1) == [8]


def test_ngram_never_matches_the_tail_itself():
    assert propose_ngram([5, 6, 7], n=2, k=3) == []
    assert propose_ngram([5, 6, 7], n=3, k=3) == []


@pytest.mark.parametrize("tokens", [[], [3], [1, 2, 3, 4]])
def test_ngram_is_empty_without_a_match(tokens):
    assert propose_ngram(tokens, n=3, k=4) == []


def test_ngram_continues_a_repeating_tail_with_its_period():
    assert propose_ngram([7, 7, 7], n=2, k=4) == [7, 7, 7, 7]
    assert propose_ngram([0, 1, 2, 0, 1, 2], n=2, k=5) == [0, 1, 2, 0, 1]


def test_ngram_matches_the_definition_on_random_sequences():
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(40))]
        n = rng.randint(1, 4)
        min_n, k = rng.randint(1, n), rng.randint(0, 6)
        assert propose_ngram(tokens, n, k, min_n) == brute_force_proposal(tokens, n, k, min_n), (tokens, n, k, min_n)


def test_incremental_index_matches_the_definition_as_tokens_grow():
    rng = random.Random(1)
    for _ in range(40):
        tokens = [rng.randrange(5) for _ in range(60)]
        index = NgramIndex(n=3, k=4, min_n=1)
        length = 0
        while length <= len(tokens):
            assert index.propose(tokens[:length]) == brute_force_proposal(tokens[:length], 3, 4)
            length += rng.choice([1, 1, 1, 3])  # sometimes several tokens arrive at once (a prompt, a step)


# ---------------------------------------------------------------------------- rejection sampler

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0)


def one_hot_logits(targets: Sequence[int], vocab: int = 8) -> torch.Tensor:
    """[len(targets), vocab] logits whose argmax in row j is targets[j]."""
    logits = torch.zeros(len(targets), vocab)
    logits[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
    return logits


def row(params: SamplingParams, prompt=(), output=(), seed: int | None = None) -> SamplingRow:
    return SamplingRow(params, list(prompt), list(output), make_generator(seed))


@pytest.mark.parametrize("drafts, expected", [
    ([3, 1, 4], [3, 1, 4, 2]),  # all accepted, then the bonus token
    ([5, 1, 4], [3]),  # the first draft rejected: the target's own token instead
    ([3, 1, 5], [3, 1, 4]),  # partial
    ([], [3]),  # no drafts: plain greedy decoding
])
def test_greedy_verify_accepts_the_prefix_matching_the_argmax(drafts, expected):
    logits = one_hot_logits([3, 1, 4, 2][:len(drafts) + 1])
    assert verify(logits, drafts, None, row(GREEDY)) == expected


def test_greedy_verify_ignores_draft_probabilities():
    q = torch.full((2, 8), 1 / 8)
    assert verify(one_hot_logits([3, 1, 4]), [3, 0], q, row(GREEDY)) == [3, 1]


def sequential_greedy(logits: torch.Tensor, drafts: Sequence[int], r: SamplingRow) -> list[int]:
    """Non-speculative decoding of the same positions: sample, append, and stop at the first
    token that differs from the draft (the positions after it would have other logits)."""
    output, tokens = list(r.output_token_ids), []
    for j in range(len(drafts) + 1):
        token = int(sampling.sample(logits[j:j + 1], [SamplingRow(r.params, r.prompt_token_ids, output, None)]))
        tokens.append(token)
        output.append(token)
        if j == len(drafts) or token != drafts[j]:
            return tokens
    raise AssertionError("unreachable")


def test_greedy_verify_penalises_the_drafts_accepted_before_each_position():
    # Position 1 prefers 2 over 5 unless 2 (the first draft, once accepted) is penalised.
    logits = torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0, 1.0],
                           [0.0, 0.0, 2.0, 0.0, 0.0, 1.9],
                           [0.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    penalised = row(SamplingParams(temperature=0.0, repetition_penalty=1.2), prompt=[0])
    assert verify(logits, [2, 5], None, penalised) == sequential_greedy(logits, [2, 5], penalised) == [2, 5, 1]
    assert verify(logits, [2, 5], None, row(GREEDY)) == [2, 2]


# A tiny vocabulary with crafted target and draft distributions (q differs from p everywhere).
P_LOGITS = torch.log(torch.tensor([[0.30, 0.05, 0.25, 0.10, 0.20, 0.10],
                                   [0.10, 0.20, 0.30, 0.15, 0.05, 0.20],
                                   [0.20, 0.20, 0.20, 0.10, 0.10, 0.20]]))
Q = torch.tensor([[0.05, 0.40, 0.10, 0.20, 0.05, 0.20],
                  [0.30, 0.05, 0.30, 0.05, 0.25, 0.05]])
TRIALS = 4000
CHI_SQUARE_5_DOF_999 = 20.515  # 99.9th percentile of chi-square with 5 degrees of freedom

Verify = Callable[[torch.Tensor, list[int], torch.Tensor | None, SamplingRow], list[int]]


def chi_square(tokens: list[int], p: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=p.numel()).double()
    expected = p.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def run_trials(verify_fn: Verify, r: SamplingRow, drafts_from_q: bool,
               ngram_drafts: Sequence[int] = (2, 5)) -> list[list[int]]:
    """Verify TRIALS draft pairs (drawn from Q, or fixed n-gram drafts). Returns the tokens at each
    position: the first token of every trial, the second of those that accepted the first draft,
    and the bonus token of those that accepted both."""
    draft_rng = make_generator(12345)
    by_position: list[list[int]] = [[], [], []]
    for _ in range(TRIALS):
        if drafts_from_q:
            drafts = torch.multinomial(Q, 1, generator=draft_rng).squeeze(1).tolist()
        else:
            drafts = list(ngram_drafts)
        tokens = verify_fn(P_LOGITS, drafts, Q if drafts_from_q else None, r)
        assert tokens[:-1] == drafts[:len(tokens) - 1]
        for position, token in enumerate(tokens):
            by_position[position].append(token)
    return by_position


def target_p(r: SamplingRow, position: int, accepted: Sequence[int]) -> torch.Tensor:
    """What the non-speculative sampler draws from at ``position`` after ``accepted`` was output."""
    context = SamplingRow(r.params, r.prompt_token_ids, [*r.output_token_ids, *accepted], None)
    return sampling.probs(P_LOGITS[position:position + 1], [context])[0]


@pytest.mark.parametrize("drafts_from_q", [True, False], ids=["draft-model", "ngram"])
def test_sampled_verify_draws_from_the_target_distribution(drafts_from_q):
    r = row(SAMPLED, seed=7)  # no penalties: each position's p does not depend on which drafts came before
    for position, tokens in enumerate(run_trials(verify, r, drafts_from_q)):
        assert len(tokens) > 200
        assert chi_square(tokens, target_p(r, position, [])) < CHI_SQUARE_5_DOF_999, position


def test_sampled_verify_applies_penalties_as_the_accepted_drafts_enter_the_output():
    r = row(SamplingParams(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5), prompt=[0], output=[4],
            seed=11)
    by_position = run_trials(verify, r, drafts_from_q=False, ngram_drafts=(2, 5))
    assert not torch.allclose(target_p(r, 1, [2]), target_p(r, 1, []), atol=0.05)  # the draft's penalty matters
    for position, tokens in enumerate(by_position):
        assert chi_square(tokens, target_p(r, position, [2, 5][:position])) < CHI_SQUARE_5_DOF_999, position


def accept_always(target_logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                  r: SamplingRow) -> list[int]:
    """A wrong rule: every draft accepted (so the first token follows q, not p)."""
    bonus = sampling.sample(target_logits[len(drafts):], [r])
    return [*drafts, int(bonus)]


def accept_with_p_but_resample_from_p(target_logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                                      r: SamplingRow) -> list[int]:
    """A subtly wrong rule for n-gram drafts: on rejection it draws from p without removing the draft."""
    p = sampling.probs(target_logits[:1], [r])
    if float(torch.rand(1, generator=r.generator)) < float(p[0, drafts[0]]):
        return [drafts[0]]
    return [int(sampling.sample_from_probs(p, [r.generator]))]


@pytest.mark.parametrize("wrong_rule, drafts_from_q", [(accept_always, True), (accept_always, False),
                                                      (accept_with_p_but_resample_from_p, False)])
def test_the_distribution_check_catches_a_wrong_rule(wrong_rule, drafts_from_q):
    r = row(SAMPLED, seed=7)
    first = run_trials(wrong_rule, r, drafts_from_q)[0]
    assert chi_square(first, target_p(r, 0, [])) > CHI_SQUARE_5_DOF_999


def test_seeded_verify_repeats_and_does_not_depend_on_the_batch():
    drafts, q = [1, 3], Q
    alone = [verify(P_LOGITS, drafts, q, row(SAMPLED, seed=3)) for _ in range(2)]
    runs = [verify(P_LOGITS, drafts, q, r) for r in [row(SAMPLED, seed=3)] * 30]  # one request, 30 steps
    batch_mates = [row(SAMPLED), row(GREEDY), row(SamplingParams(temperature=0.5, top_k=3), seed=9)]
    seeded = row(SAMPLED, seed=3)
    in_batch = []
    for _ in range(30):
        logits = torch.cat([P_LOGITS] * 4)
        in_batch.append(verify_batch(logits, [[0, 0], drafts, [1, 1], [2, 2]], [None, q, None, Q],
                                     [batch_mates[0], seeded, batch_mates[1], batch_mates[2]])[1])
    assert alone[0] == alone[1]
    assert in_batch == runs


def test_verify_batch_equals_verify_per_request():
    rows_a = [row(GREEDY), row(SAMPLED, seed=1), row(SamplingParams(temperature=0.8, repetition_penalty=1.3),
                                                     output=[2], seed=2)]
    rows_b = [row(GREEDY), row(SAMPLED, seed=1), row(SamplingParams(temperature=0.8, repetition_penalty=1.3),
                                                     output=[2], seed=2)]
    drafts = [[0, 2], [], [2]]
    logits = torch.cat([P_LOGITS, P_LOGITS[:1], P_LOGITS[:2]])
    for _ in range(20):
        batched = verify_batch(logits, drafts, [None, None, Q[:1]], rows_a)
        single = [verify(P_LOGITS, drafts[0], None, rows_b[0]), verify(P_LOGITS[:1], [], None, rows_b[1]),
                  verify(P_LOGITS[:2], [2], Q[:1], rows_b[2])]
        assert batched == single


def test_ngram_draft_with_zero_target_probability_is_always_rejected():
    masked = row(SamplingParams(temperature=1.0, top_k=2), seed=5)  # keeps tokens 0 and 2 at position 0
    for _ in range(200):
        tokens = verify(P_LOGITS, [1, 1], None, masked)
        assert tokens[0] in (0, 2) and len(tokens) == 1


# ---------------------------------------------------------------------------- adaptive k


def test_adaptive_k_starts_at_k_max_and_stays_there_while_drafts_hold():
    controller = AdaptiveK(k_max=4)
    for _ in range(5):
        assert controller.k == 4
        controller.update(proposed=4, accepted=4)


def test_adaptive_k_follows_partial_acceptance_and_grows_back():
    controller = AdaptiveK(k_max=5)
    controller.update(proposed=5, accepted=1)
    assert controller.k == 2
    controller.update(proposed=2, accepted=2)
    controller.update(proposed=3, accepted=3)
    assert controller.k == 4


def test_adaptive_k_halves_on_misses_then_switches_off_and_probes():
    controller = AdaptiveK(k_max=8, patience=4, probe_every=16)
    ks = []
    for _ in range(4):
        ks.append(controller.k)
        controller.update(proposed=controller.k, accepted=0)
    assert ks == [8, 4, 2, 1] and controller.k == 0
    for _ in range(15):
        controller.update(proposed=0, accepted=0)
        assert controller.k == 0
    controller.update(proposed=0, accepted=0)
    assert controller.k == 1  # the probe
    controller.update(proposed=1, accepted=0)
    assert controller.k == 0  # a missed probe: off again for another 16 steps
    for _ in range(16):
        controller.update(proposed=0, accepted=0)
    controller.update(proposed=1, accepted=1)  # a hit: speculation is back and grows
    assert controller.k == 2


def test_adaptive_k_ignores_steps_without_proposals():
    controller = AdaptiveK(k_max=4, patience=2)
    controller.update(proposed=4, accepted=0)
    for _ in range(10):
        controller.update(proposed=0, accepted=0)
    assert controller.k == 2
    controller.update(proposed=2, accepted=1)  # a hit resets the misses
    controller.update(proposed=2, accepted=0)
    assert controller.k == 1


def test_adaptive_k_wastes_little_on_drafts_that_never_hold():
    controller = AdaptiveK(k_max=8, patience=4, probe_every=16)
    drafted = 0
    for _ in range(1600):
        drafted += controller.k
        controller.update(proposed=controller.k, accepted=0)
    assert drafted <= 8 + 4 + 2 + 1 + 1600 // 16
