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
