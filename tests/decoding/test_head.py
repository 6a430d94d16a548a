"""The deferral head, the marginal-likelihood loss and the weak labels, each against a
direct computation: plain Python loops in float64 over probabilities, and on the
tiny models a separate uncached forward for every prefix."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from decoding.head import (
    DeferralHead,
    choose_writers,
    deferral_probability,
    marginal_nll,
    top1_hits,
    weak_labels,
    weighted_init_loss,
    z_log_probs,
)
from tests.decoding.conftest import random_head


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_one_assistant_is_the_papers_sigmoid_head() -> None:
    s = torch.linspace(-12, 12, 25)[:, None]  # (N, 1)
    log_pz = z_log_probs(s)
    assert torch.allclose(log_pz[:, 1], torch.nn.functional.logsigmoid(s[:, 0]), atol=1e-6)
    assert torch.allclose(log_pz[:, 0], torch.nn.functional.logsigmoid(-s[:, 0]), atol=1e-6)
    assert torch.allclose(deferral_probability(log_pz), torch.sigmoid(s[:, 0]), atol=1e-6)


def test_head_scores_are_a_bias_free_linear_map() -> None:
    head = random_head(2, seed=3, hidden=5)
    h = torch.randn(7, 5)
    want = [[sum(float(head.weight.detach()[j, i]) * float(h[n, i]) for i in range(5)) for j in range(2)] for n in range(7)]
    assert torch.allclose(head.scores(h), torch.tensor(want), atol=1e-5)
    assert head.scores(torch.zeros(1, 5)).abs().max() == 0  # no bias, as the reference's extra LM-head row


def test_marginal_nll_one_assistant_equals_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(11, 1, generator=gen) * 3
    lp = torch.log_softmax(torch.randn(11, 2, 9, generator=gen), dim=-1)[:, :, 0]  # (N, 2) log-probs of a gold token
    loss = marginal_nll(z_log_probs(d), lp)
    direct = []
    for n in range(11):
        g = _sigmoid(float(d[n, 0]))
        direct.append(-math.log((1 - g) * math.exp(float(lp[n, 0])) + g * math.exp(float(lp[n, 1]))))
    assert float(loss) == pytest.approx(sum(direct) / len(direct), rel=1e-5)
    # the reference's form: -logsumexp([logsigmoid(-d) + log P_base, logsigmoid(d) + log P_asst]).mean()
    ref = -torch.logsumexp(
        torch.cat([torch.nn.functional.logsigmoid(-d) + lp[:, :1], torch.nn.functional.logsigmoid(d) + lp[:, 1:]], dim=-1), dim=-1
    ).mean()
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_marginal_nll_several_assistants_equals_direct_computation() -> None:
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(9, 3, generator=gen) * 2  # three assistants
    lp = torch.log_softmax(torch.randn(9, 4, 7, generator=gen), dim=-1)[:, :, 2]
    loss = marginal_nll(z_log_probs(s), lp)
    direct = []
    for n in range(9):
        logits = [0.0] + [float(x) for x in s[n]]
        z = sum(math.exp(x) for x in logits)
        p = sum(math.exp(logits[j]) / z * math.exp(float(lp[n, j])) for j in range(4))
        direct.append(-math.log(p))
    assert float(loss) == pytest.approx(sum(direct) / len(direct), rel=1e-5)


def test_weighted_init_loss_is_bce_with_pos_weight_for_one_assistant() -> None:
    gen = torch.Generator().manual_seed(2)
    d = torch.randn(20, 1, generator=gen) * 2
    y = (torch.rand(20, generator=gen) < 0.3).long()
    ours = weighted_init_loss(z_log_probs(d), y, pos_weight=8.0)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([8.0]))(d[:, 0], y.float())
    assert float(ours) == pytest.approx(float(bce), rel=1e-6)


def test_weighted_init_loss_several_assistants_direct() -> None:
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(10, 2, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 2, 1, 0, 0, 2, 1])
    ours = weighted_init_loss(z_log_probs(s), y, pos_weight=5.0)
    direct = 0.0
    for n in range(10):
        logits = [0.0] + [float(x) for x in s[n]]
        p = math.exp(logits[int(y[n])]) / sum(math.exp(x) for x in logits)
        direct += (5.0 if y[n] > 0 else 1.0) * -math.log(p)
    assert float(ours) == pytest.approx(direct / 10, rel=1e-5)


def test_weak_labels_equal_direct_computation() -> None:
    gen = torch.Generator().manual_seed(4)
    base_hits = torch.rand(40, generator=gen) < 0.4
    hits = torch.rand(40, 3, generator=gen) < 0.5
    lp = -torch.rand(40, 3, generator=gen) * 4
    got = weak_labels(base_hits, hits, lp).tolist()
    for n in range(40):
        correct = [j for j in range(3) if hits[n, j]]
        if base_hits[n] or not correct:
            want = 0
        else:
            want = 1 + max(correct, key=lambda j: float(lp[n, j]))
        assert got[n] == want, n
    # one assistant: the reference's "init method a", is_top1_assistant > is_top1_base
    one = weak_labels(base_hits, hits[:, :1], lp[:, :1])
    assert one.tolist() == (hits[:, 0].long() > base_hits.long()).long().tolist()


def test_top1_hits_count_ties_as_hits() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0], [5.0, 0.0, 1.0]])
    assert top1_hits(logits, torch.tensor([2, 1])).tolist() == [True, False]
    assert top1_hits(logits, torch.tensor([1, 0])).tolist() == [True, True]


def test_choose_writers_thresholds() -> None:
    s = torch.tensor([[-30.0, -31.0], [0.5, 2.0], [3.0, -1.0], [40.0, 39.0]])  # g: ~0, 0.9, 0.95, ~1
    lp = z_log_probs(s)
    g = deferral_probability(lp)
    assert choose_writers(lp, 0.0).tolist() == [1, 2, 1, 1]  # eta = 0: always, even where g rounds to 0
    assert choose_writers(lp, 1.0).tolist() == [0, 0, 0, 0]  # eta = 1: never, even where g rounds to 1
    assert choose_writers(lp, 0.92).tolist() == [0 if float(x) <= 0.92 else w for x, w in zip(g, [1, 2, 1, 1])]
    assert choose_writers(lp, 0.92).tolist() == [0, 0, 1, 1]


def test_init_from_output_embeddings_is_their_mean() -> None:
    head = DeferralHead(4, 2)
    emb = torch.arange(12.0).reshape(3, 4)
    head.init_from_output_embeddings(emb)
    assert torch.equal(head.weight, torch.tensor([[4.0, 5.0, 6.0, 7.0]] * 2))


# ------------------------------------------------------- on the tiny models
def _uncached(expert: Any, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    out = expert.forward(torch.tensor([ids]), use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1][0, -1].float(), out.logits[0, -1].float()


@pytest.fixture(scope="module")
def scored(tiny_expert: Any, assistants: list[Any]) -> tuple[Any, Any, list[tuple[list[int], list[int]]]]:
    from collab import decode
    from decoding.data import load_data
    from decoding.features import score_data

    # answers written by the assistants (greedy), so each assistant's top-1 is often the
    # gold token and the weak labels take every value
    prompts = [p for p, _ in load_data("skill:mixed", 6).tokenize(tiny_expert)]
    items = []
    for i, prompt in enumerate(prompts):
        writer = [tiny_expert, *assistants][i % 3]
        out = decode.generate(writer, _request(6), prompts=[prompt])
        items.append((prompt, writer.tokenizer(out.text, add_special_tokens=False).input_ids[:6] + [tiny_expert.tokenizer.eos_token_id]))
    return score_data(tiny_expert, assistants, items, batch_size=4), items, None


def _request(n: int) -> Any:
    from collab.system import GenerationRequest

    return GenerationRequest(prompt="x", max_tokens=n)


def test_scored_features_equal_one_uncached_forward_per_prefix(tiny_expert: Any, assistants: list[Any], scored: Any) -> None:
    features, items, _ = scored
    models = [tiny_expert, *assistants]
    row = 0
    for prompt, answer in items:
        for t, gold in enumerate(answer):
            prefix = prompt + answer[:t]
            for j, m in enumerate(models):
                hidden, logits = _uncached(m, prefix)
                logp = torch.log_softmax(logits, dim=-1)
                assert float(features.log_probs[row, j]) == pytest.approx(float(logp[gold]), abs=1e-4)
                assert bool(features.hits[row, j]) == (int(logits.argmax()) == gold or float(logits[gold]) >= float(logits.max()))
                if j == 0:
                    assert torch.allclose(features.hidden[row], hidden, atol=1e-4)
            row += 1
    assert row == features.hidden.shape[0] == int(features.offsets[-1])


def test_marginal_loss_and_weak_labels_on_tiny_models_equal_direct_computation(tiny_expert: Any, assistants: list[Any], scored: Any) -> None:
    features, items, _ = scored
    head = random_head(2, seed=5)
    loss = marginal_nll(head.log_probs(features.hidden), features.log_probs)
    labels = weak_labels(features.hits[:, 0], features.hits[:, 1:], features.log_probs[:, 1:]).tolist()
    models = [tiny_expert, *assistants]
    nll, want_labels = [], []
    for prompt, answer in items:
        for t, gold in enumerate(answer):
            prefix = prompt + answer[:t]
            outs = [_uncached(m, prefix) for m in models]
            s = [0.0] + [float(x) for x in head.weight.detach().double() @ outs[0][0].double()]
            z = sum(math.exp(x) for x in s)
            probs = [torch.softmax(lg.double(), dim=-1) for _, lg in outs]
            nll.append(-math.log(sum(math.exp(s[j]) / z * float(probs[j][gold]) for j in range(3))))
            argmaxes = [int(p.argmax()) for p in probs]
            right = [j for j in (1, 2) if argmaxes[j] == gold]
            want_labels.append(0 if argmaxes[0] == gold or not right else max(right, key=lambda j: float(probs[j][gold])))
    assert float(loss) == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    assert labels == want_labels
    assert {0, 1, 2} <= set(labels)  # every branch of the labelling is exercised
