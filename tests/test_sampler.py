"""Sampler: greedy, temperature, top-k, top-p, and per-request seeds."""

from __future__ import annotations

import torch

from engine.api import SamplingParams
from engine.sampler import Sampler

GREEDY = SamplingParams(temperature=0)


def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` independent draws from one row, vectorised as ``n`` identical rows."""
    sampler = Sampler(torch.Generator().manual_seed(seed))
    return sampler(logits.expand(n, -1).contiguous(), [params] * n)


def freqs(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / tokens.numel()


def test_greedy_is_argmax_and_unaffected_by_sampled_mates() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [GREEDY, SamplingParams(temperature=1.0), GREEDY, SamplingParams(top_k=3)] + [
        GREEDY
    ] * 2
    out = Sampler(torch.Generator().manual_seed(0))(logits, params)
    assert out.dtype == torch.long and out.shape == (6,)
    for i in (0, 2, 4, 5):
        assert out[i] == logits[i].argmax()
    assert torch.equal(Sampler()(logits, [GREEDY] * 6), logits.argmax(-1))


def test_temperature_sampling_matches_softmax() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log()[None]
    got = freqs(draws(logits, SamplingParams(temperature=1.0), 40_000), 4)
    assert torch.allclose(got, probs, atol=0.015), got
    # temperature 2 flattens: p ** (1/2), renormalised
    flat = probs.sqrt() / probs.sqrt().sum()
    got = freqs(draws(logits, SamplingParams(temperature=2.0), 40_000, seed=1), 4)
    assert torch.allclose(got, flat, atol=0.015), got


def test_low_temperature_is_nearly_greedy() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    assert set(draws(logits, SamplingParams(temperature=0.01), 500).tolist()) == {1}


def test_top_k() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, 2.5, -1.0]])
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=1), 200).tolist()) == {1}
    got = draws(logits, SamplingParams(temperature=1.0, top_k=3), 20_000)
    assert set(got.tolist()) == {1, 3, 4}
    kept = torch.tensor([3.0, 2.0, 2.5]).softmax(0)
    assert torch.allclose(freqs(got, 6)[[1, 3, 4]], kept, atol=0.02)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()[None]
    got = draws(logits, SamplingParams(temperature=1.0, top_p=0.7), 20_000)
    assert set(got.tolist()) == {1, 3}  # 0.5 + 0.3 >= 0.7
    assert abs(freqs(got, 4)[1].item() - 0.5 / 0.8) < 0.02
    # a top token holding more than top_p is the only one left
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.4), 300).tolist()) == {1}
    # top_p = 1 keeps every token
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=1.0), 4000).tolist()) == {
        0,
        1,
        2,
        3,
    }


def test_top_k_then_top_p() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()[None]
    # top_k=3 renormalises to 4/9, 3/9, 2/9; top_p=0.7 then keeps the first two
    got = draws(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.7), 5000)
    assert set(got.tolist()) == {0, 1}


def test_seeded_request_is_reproducible_whatever_its_batch_mates() -> None:
    vocab = 100
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    gen_logits = torch.Generator().manual_seed(7)
    steps = [torch.randn(1, vocab, generator=gen_logits) for _ in range(6)]

    def run(mates: list[SamplingParams]) -> list[int]:
        sampler = Sampler(torch.Generator().manual_seed(len(mates)))
        own = torch.Generator().manual_seed(seeded.seed)
        out = []
        for row in steps:
            others = torch.randn(len(mates), vocab)
            logits = torch.cat([others[: len(mates) // 2], row, others[len(mates) // 2 :]])
            params = mates[: len(mates) // 2] + [seeded] + mates[len(mates) // 2 :]
            gens = [None] * len(mates)
            gens.insert(len(mates) // 2, own)
            out.append(int(sampler(logits, params, gens)[len(mates) // 2]))
        return out

    alone = run([])
    mates = [
        GREEDY,
        SamplingParams(temperature=1.0),
        SamplingParams(top_k=5, seed=9),
        SamplingParams(),
    ]
    assert run(mates) == alone
    assert run(mates[:1]) == alone
    assert len(set(alone)) > 1  # it really samples


def test_unseeded_draws_follow_the_engine_generator() -> None:
    logits = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=1.0)] * 8
    a = Sampler(torch.Generator().manual_seed(5))(logits, params)
    b = Sampler(torch.Generator().manual_seed(5))(logits, params)
    assert torch.equal(a, b)


def test_masked_logits_are_never_drawn() -> None:
    logits = torch.full((1, 10), float("-inf"))
    logits[0, 4] = 0.0
    assert set(draws(logits, SamplingParams(temperature=1.5), 100).tolist()) == {4}
