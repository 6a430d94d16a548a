from __future__ import annotations

import numpy as np
import pytest

from routers.policies import BudgetPolicy, CascadePolicy, CostPolicy, PolicyError, make_policy, quality_minus_cost


def test_quality_minus_cost_trades_off() -> None:
    pred = np.array([[0.6, 0.9], [0.5, 0.55]])
    costs = np.array([0.0, 1.0])
    assert quality_minus_cost(pred, costs, 0.0).tolist() == [1, 1]
    assert quality_minus_cost(pred, costs, 0.1).tolist() == [1, 0]
    assert quality_minus_cost(pred, costs, 1.0).tolist() == [0, 0]
    d = CostPolicy(lam=0.1, costs=[0.0, 1.0]).decide(pred, ["a", "b"])
    assert [x.ranking[0] for x in d] == [1, 0] and "0.1 x cost" in d[0].reason


def test_budget_calibrates_share_on_validation() -> None:
    rng = np.random.default_rng(0)
    val, test = rng.random((1000, 3)), rng.random((1000, 3))
    pol = BudgetPolicy(expensive=2, share=0.2).calibrate(val)
    assert abs(pol.calibrated_share - 0.2) < 0.005
    achieved = (pol.choices(test) == 2).mean()
    assert abs(achieved - 0.2) < 0.05
    d = pol.decide(test[:3], ["a", "b", "c"])
    assert all("budget 20%" in x.reason for x in d)


def test_cascade_threshold_escalates_unsure_answers() -> None:
    conf = np.array([-0.1, -0.2, -2.0, -3.0])
    cheap = np.array([1.0, 1.0, 0.0, 0.0])
    strong = np.array([1.0, 0.0, 1.0, 1.0])
    pol = CascadePolicy(cheap=0, strong=1).calibrate(conf, cheap, strong, max_escalation=0.5)
    assert pol.escalate(-2.5) and pol.escalate(-2.0) and not pol.escalate(-0.2)


def test_make_policy_errors_name_the_expert() -> None:
    with pytest.raises(PolicyError, match="policy.expensive: unknown expert 'gpt'"):
        make_policy({"type": "budget", "expensive": "gpt"}, ["a", "b"])
    with pytest.raises(PolicyError, match="unknown policy 'fast'"):
        make_policy({"type": "fast"}, ["a"])
    assert make_policy({"type": "cascade", "cheap": "a", "strong": "b", "threshold": -1.5}, ["a", "b"]).threshold == -1.5


@pytest.mark.parametrize(
    "config, message",
    [
        ({"type": "cost", "lamda": 5}, "policy.lamda: unknown key for policy type 'cost'; allowed keys: type, lambda, costs"),
        ({"type": "budget", "expensive": "b", "budget": 0.3}, "policy.budget: unknown key for policy type 'budget'; allowed keys: type, expensive, share, threshold"),
        ({"type": "cascade", "cheap": "a", "strong": "b", "treshold": -1}, "policy.treshold: unknown key for policy type 'cascade'; allowed keys: type, cheap, strong, threshold"),
        ({"type": "best", "lambda": 0.1}, "policy.lambda: unknown key for policy type 'best'; allowed keys: type"),
        ({"type": "cost", "lambda": "high"}, "policy.lambda: expected a number, found 'high'"),
        ({"type": "cost", "lambda": -0.5}, "policy.lambda: expected a number >= 0, found -0.5"),
        ({"type": "cost", "costs": {"a": 1, "b": "cheap"}}, "policy.costs.b: expected a number >= 0, found 'cheap'"),
        ({"type": "budget", "expensive": "b", "share": 1.5}, "policy.share: expected a number in [0, 1], found 1.5"),
        ({"type": "cascade", "cheap": "a", "strong": "a"}, "policy.strong: expected an expert other than the cheap one"),
    ],
)
def test_make_policy_refuses_unknown_keys_and_bad_values(config: dict, message: str) -> None:
    with pytest.raises(PolicyError) as e:
        make_policy(config, ["a", "b"], source="spec.yaml")
    assert str(e.value).startswith(f"spec.yaml: {message}")


def test_cost_policy_weighs_the_costs_it_is_passed_and_refuses_none() -> None:
    pred = np.array([[0.9, 0.8]])
    assert CostPolicy(lam=0.05).decide(pred, ["big", "small"], np.array([10.0, 1.0]))[0].ranking == [1, 0]
    assert CostPolicy(lam=0.05, costs=[1.0, 1.0]).decide(pred, ["big", "small"], np.array([10.0, 1.0]))[0].ranking == [0, 1]  # its own win
    with pytest.raises(PolicyError, match=r"policy 'cost': no cost for the experts \(big, small\)"):
        CostPolicy(lam=0.05).decide(pred, ["big", "small"])
