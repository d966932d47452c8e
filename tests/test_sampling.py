"""The sampler: penalties, temperature, top-k / top-p / min-p masks, greedy, seeded draws, probs == sample."""

from __future__ import annotations

import math

import pytest
import torch

from picochat.config import SamplingParams
from picochat.engine import sampling
from picochat.engine.sampling import SamplingRow, make_generator, probs, process_logits, sample, sample_from_probs
from picochat.errors import ConfigError


def row(prompt=(), output=(), generator=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params).validate(), list(prompt), list(output), generator)


def kept(logits: list[float], **params) -> set[int]:
    """The token ids a single row may still draw after processing."""
    p = probs(torch.tensor([logits]), [row(**params)])[0]
    return set(torch.nonzero(p).flatten().tolist())


def logits_for(distribution: list[float]) -> list[float]:
    return [math.log(x) for x in distribution]


def reference_kept(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """Straightforward per-token reading of the definitions, for one row (no ties in its input)."""
    scaled = logits / params.temperature
    order = scaled.argsort(descending=True).tolist()
    keep = order[:params.top_k] if 0 < params.top_k < len(order) else order
    p = scaled[keep].softmax(-1).tolist()
    mass, nucleus = 0.0, []
    for token, q in zip(keep, p):
        nucleus.append(token)
        mass += q
        if mass >= params.top_p:
            break
    best = max(p)
    return {t for t, q in zip(keep, p) if t in nucleus and q >= params.min_p * best}


# ---------------------------------------------------------------------------- greedy

def test_greedy_picks_the_max_for_fp32_and_bf16():
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.9], [5.0, 1.0, 4.0, 0.0]])
    rows = [row(temperature=0.0), row(temperature=0.0)]
    assert sample(logits, rows).tolist() == [1, 0]
    assert sample(logits.bfloat16(), rows).tolist() == [1, 0]
    assert probs(logits, rows).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_greedy_rows_ignore_temperature_and_masks_but_not_penalties():
    logits = torch.tensor([[4.0, 3.0, 1.0]])
    greedy = row(temperature=0.0, top_k=1, min_p=0.9, repetition_penalty=2.0, output=[0])
    assert process_logits(logits, [greedy]).tolist() == [[2.0, 3.0, 1.0]]
    assert sample(logits, [greedy]).tolist() == [1]


def test_temperature_below_epsilon_is_greedy():
    logits = torch.tensor([[0.0, 1.0, 1.0 - 1e-6]])
    r = row(temperature=1e-6)
    assert probs(logits, [r]).tolist() == [[0.0, 1.0, 0.0]]
    assert sample(logits, [r]).tolist() == [1]


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = torch.tensor([[0.0, 9.0, 0.0], [1.0, 1.0, 1.0], [7.0, 0.0, 0.0]])
    rows = [row(temperature=0.0), row(temperature=1.0, top_k=1), row(temperature=0.0)]
    tokens = sample(logits, rows)
    assert tokens[0] == 1 and tokens[2] == 0
    assert tokens[1] in (0, 1, 2)  # top-k 1 over a three-way tie keeps all three


def test_input_logits_are_not_modified():
    logits = torch.tensor([[1.0, -1.0, 2.0]])
    before = logits.clone()
    process_logits(logits, [row(temperature=0.5, top_k=1, repetition_penalty=1.5, frequency_penalty=1.0, output=[0])])
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------- masks

def test_top_k_keeps_the_k_largest():
    logits = [0.3, 2.0, -1.0, 1.5, 0.9]
    assert kept(logits, temperature=1.0, top_k=1) == {1}
    assert kept(logits, temperature=1.0, top_k=3) == {1, 3, 4}


def test_top_k_keeps_ties_with_the_kth_logit():
    assert kept([3.0, 2.0, 2.0, 1.0], temperature=1.0, top_k=2) == {0, 1, 2}


@pytest.mark.parametrize("top_k", [-1, 0, 4, 100])
def test_top_k_off_or_at_least_the_vocab_keeps_everything(top_k):
    assert kept([3.0, 2.0, 1.0, 0.0], temperature=1.0, top_k=top_k) == {0, 1, 2, 3}


def test_top_p_keeps_the_token_that_crosses_the_mass():
    logits = logits_for([0.15, 0.5, 0.05, 0.3])
    assert kept(logits, temperature=1.0, top_p=0.45) == {1}
    assert kept(logits, temperature=1.0, top_p=0.7) == {1, 3}  # 0.5 < 0.7 ≤ 0.8
    assert kept(logits, temperature=1.0, top_p=0.9) == {0, 1, 3}  # 0.8 < 0.9 ≤ 0.95
    assert kept(logits, temperature=1.0, top_p=0.99) == {0, 1, 2, 3}


def test_top_p_keeps_ties_with_the_boundary_token():
    logits = logits_for([0.4, 0.2, 0.2, 0.2])
    assert kept(logits, temperature=1.0, top_p=0.5) == {0, 1, 2, 3}
    assert kept(logits, temperature=1.0, top_p=0.3) == {0}


def test_top_p_applies_to_the_distribution_left_by_top_k():
    logits = logits_for([0.4, 0.3, 0.2, 0.1])
    # After top-k 2 the masses are 4/7 and 3/7: top-p 0.6 needs both (4/7 ≈ 0.57 < 0.6).
    assert kept(logits, temperature=1.0, top_k=2, top_p=0.6) == {0, 1}
    assert kept(logits, temperature=1.0, top_p=0.6) == {0, 1}
    assert kept(logits, temperature=1.0, top_k=2, top_p=0.55) == {0}
    assert kept(logits, temperature=1.0, top_p=0.55) == {0, 1}


def test_min_p_keeps_tokens_within_a_fraction_of_the_max():
    logits = logits_for([0.5, 0.26, 0.24])
    assert kept(logits, temperature=1.0, min_p=0.5) == {0, 1}  # 0.24 < 0.5 · 0.5 ≤ 0.26
    assert kept(logits, temperature=1.0, min_p=1.0) == {0}


def test_min_p_is_relative_to_the_tempered_distribution():
    logits = logits_for([0.5, 0.26, 0.24])
    assert kept(logits, temperature=0.5, min_p=0.5) == {0}  # (0.26 / 0.5)² ≈ 0.27 < 0.5


@pytest.mark.parametrize("candidates", [1000, 3], ids=["whole-row", "few-candidates-and-fallback"])
def test_masks_match_the_definitions_on_random_logits(monkeypatch, candidates):
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", candidates)
    generator = torch.Generator().manual_seed(0)
    settings = [dict(top_p=0.9), dict(top_p=0.5, top_k=20), dict(top_k=7), dict(min_p=0.1, top_p=0.8),
                dict(temperature=0.6, top_p=0.95, min_p=0.02), dict(temperature=1.7, top_k=50, top_p=0.3)]
    rows, logits = [], torch.randn(len(settings) * 3, 300, generator=generator) * 2.5
    for setting in settings * 3:
        rows.append(row(**{"temperature": 1.0, **setting}))
    p = probs(logits, rows)
    for i, r in enumerate(rows):
        assert set(torch.nonzero(p[i]).flatten().tolist()) == reference_kept(logits[i], r.params), r.params


def test_rows_are_processed_independently_of_their_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    rows = [row(temperature=0.8, top_p=0.7), row(temperature=0.0), row(temperature=1.2, top_k=5),
            row(temperature=1.0, min_p=0.2, output=[3, 3], frequency_penalty=0.5)]
    together = probs(logits, rows)
    for i, r in enumerate(rows):
        assert torch.equal(probs(logits[i:i + 1], [r])[0], together[i])


# ---------------------------------------------------------------------------- penalties

def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0]])
    r = row(temperature=0.0, repetition_penalty=2.0, prompt=[0], output=[1, 4])
    assert process_logits(logits, [r]).tolist() == [[1.0, -4.0, 2.0, -2.0, 0.0]]


def test_repetition_penalty_below_one_rewards_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    r = row(temperature=0.0, repetition_penalty=0.5, prompt=[0, 1, 1])
    assert process_logits(logits, [r]).tolist() == [[4.0, -1.0, 1.0]]


def test_presence_and_frequency_count_output_tokens_only():
    logits = torch.zeros(1, 5)
    r = row(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, prompt=[0, 0, 4], output=[1, 2, 2, 2])
    assert process_logits(logits, [r]).tolist() == [[0.0, -0.75, -1.25, 0.0, 0.0]]


def test_combined_penalties_apply_repetition_then_frequency_and_presence():
    logits = torch.tensor([[3.0, -1.0, 2.0, 1.0]])
    r = row(temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5,
            prompt=[2], output=[0, 0, 1])
    # 0: 3/1.5 − 0.5·2 − 1 = 0;  1: −1·1.5 − 0.5 − 1 = −3;  2: 2/1.5 (prompt only);  3 unseen.
    assert process_logits(logits, [r]) == pytest.approx(torch.tensor([[0.0, -3.0, 2.0 / 1.5, 1.0]]))


def test_penalties_differ_per_row():
    logits = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    rows = [row(temperature=0.0, frequency_penalty=1.0, output=[0, 0]), row(temperature=0.0),
            row(temperature=0.0, repetition_penalty=2.0, output=[1])]
    assert process_logits(logits, rows).tolist() == [[-1.0, 1.0], [1.0, 1.0], [1.0, 0.5]]


def test_penalties_over_rows_of_different_lengths_count_only_real_tokens():
    logits = torch.zeros(3, 4)
    rows = [row(temperature=0.0, frequency_penalty=1.0, output=[2]),
            row(temperature=0.0, frequency_penalty=1.0, presence_penalty=0.5, output=[3, 1, 3, 3]),
            row(temperature=0.0, repetition_penalty=2.0, prompt=[1], output=[])]
    assert process_logits(logits - 1.0, rows).tolist() == [[-1.0, -1.0, -2.0, -1.0],
                                                           [-1.0, -2.5, -1.0, -4.5],
                                                           [-1.0, -2.0, -1.0, -1.0]]


def test_first_step_without_output_tokens_has_no_output_penalty():
    logits = torch.tensor([[1.0, 2.0]])
    r = row(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0, prompt=[0, 1])
    assert process_logits(logits, [r]).tolist() == [[1.0, 2.0]]


def test_penalised_greedy_row_changes_its_token():
    logits = torch.tensor([[5.0, 4.5, 0.0]])
    assert sample(logits, [row(temperature=0.0, presence_penalty=1.0, output=[0])]).tolist() == [1]


# ---------------------------------------------------------------------------- temperature and probs

@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_probs_is_the_softmax_of_the_tempered_logits(temperature):
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    expected = (logits / temperature).softmax(-1)
    assert probs(logits, [row(temperature=temperature)]) == pytest.approx(expected, abs=1e-6)


def test_bf16_logits_give_fp32_probs():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]])  # exact in bf16
    p = probs(logits.bfloat16(), [row(temperature=0.5, top_k=3)])
    expected = torch.tensor([[4.0, 1.0, -math.inf, 0.0]]).softmax(-1)
    assert p.dtype == torch.float32
    assert p == pytest.approx(expected, abs=1e-6)


def test_higher_temperature_flattens_the_distribution():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    maxima = [probs(logits, [row(temperature=t)])[0].max().item() for t in (0.3, 1.0, 3.0)]
    assert maxima[0] > maxima[1] > maxima[2] > 0.25


# ---------------------------------------------------------------------------- drawing

def draw_sequence(seed: int, batch_before: int, batch_after: int, steps: int = 8) -> list[int]:
    """Tokens of one seeded row over several steps, with unseeded rows around it."""
    generator = make_generator(seed)
    logits_gen = torch.Generator().manual_seed(123)
    tokens = []
    for _ in range(steps):
        logits = torch.randn(1, 64, generator=logits_gen)
        noise = torch.randn(batch_before + batch_after, 64)
        batch = torch.cat([noise[:batch_before], logits, noise[batch_before:]])
        rows = [row(temperature=1.0)] * batch_before + [row(temperature=1.0, top_p=0.95, generator=generator)]
        rows += [row(temperature=0.7, top_k=3)] * batch_after
        tokens.append(sample(batch, rows)[batch_before].item())
    return tokens


def test_seeded_rows_repeat_whatever_the_batch():
    alone = draw_sequence(seed=7, batch_before=0, batch_after=0)
    assert draw_sequence(seed=7, batch_before=3, batch_after=1) == alone
    assert draw_sequence(seed=7, batch_before=0, batch_after=5) == alone
    assert draw_sequence(seed=8, batch_before=0, batch_after=0) != alone


def test_make_generator_without_seed_is_none():
    assert make_generator(None) is None
    assert make_generator(3).initial_seed() == 3


def chi_square(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    support = p > 0
    return (((counts - expected)[support] ** 2) / expected[support]).sum().item()


# 99.9th percentile of chi-square with 3 degrees of freedom (four tokens left after the masks)
CHI_SQUARE_3_DOF_999 = 16.27


def test_unseeded_draws_follow_probs():
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.2, 2.0, -3.0, 0.7, -0.5]])
    r = row(temperature=0.9, top_p=0.95, output=[2], presence_penalty=0.3)
    p = probs(logits, [r])[0]
    assert (p > 0).sum() == 4  # the masks left four tokens
    n = 4000
    tokens = sample(logits.expand(n, -1), [r] * n)
    counts = torch.bincount(tokens, minlength=6).float()
    assert counts[p == 0].sum() == 0
    assert chi_square(counts, p) < CHI_SQUARE_3_DOF_999


def test_seeded_draws_follow_probs():
    logits = torch.tensor([[0.0, 1.0, 0.5, -0.2, -4.0]])
    r = row(temperature=1.3, min_p=0.1, generator=make_generator(11))
    p = probs(logits, [r])[0]
    assert (p > 0).sum() == 4
    tokens = torch.cat([sample(logits, [r]) for _ in range(3000)])
    counts = torch.bincount(tokens, minlength=5).float()
    assert counts[p == 0].sum() == 0
    assert chi_square(counts, p) < CHI_SQUARE_3_DOF_999


def test_sample_from_probs_never_draws_a_zero_probability_token():
    p = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [0.5, 0.0, 0.0, 0.0]]).repeat(200, 1)
    assert sample_from_probs(p, [None] * 600).tolist() == [1, 3, 0] * 200


# ---------------------------------------------------------------------------- params

@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_k=-2), dict(min_p=1.5),
                                 dict(repetition_penalty=0.0), dict(presence_penalty=2.5)])
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ConfigError):
        SamplingParams(**bad).validate()
