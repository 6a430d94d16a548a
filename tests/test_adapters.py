"""LoRA adapters of one base held unmerged in an AdapterBank: a batch whose rows go to
different adapters runs as one forward per step, and each row answers as its adapter
alone would (collab.adapters; RoutedSystem.generate_batch; a spec's adapter_batch)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collab.adapters import BASE, AdapterBank, AdapterExpert, adapter_groups
from collab.errors import SpecError
from collab.spec import load_spec
from collab.system import GenerationRequest
from routers.base import Router
from routers.baselines import constant_router
from routers.system import RoutedSystem
from tests.contract import SystemContract

PROMPTS = [
    "What is 2 + 2?",
    "Reverse the list [1, 2, 3]",
    "The capital of France is",
    "Convert 3 km to m",
    "Hello there! How can I help you today?",
    "def add(a, b):",
]


def _make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A random LoRA adapter on ``base`` (all linear layers), saved with peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    cfg = LoraConfig(
        r=4, lora_alpha=8, task_type="CAUSAL_LM", init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # large enough that each adapter changes greedy answers
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(str(out))
    meta = json.loads((out / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_model(root / "base", seed=21)
    return {"base": base, "x": _make_adapter(base, root / "x", 1), "y": _make_adapter(base, root / "y", 2)}


@pytest.fixture(scope="module")
def bank(dirs: dict[str, Path]) -> AdapterBank:
    return AdapterBank.load(str(dirs["base"]), {"x": dirs["x"], "y": dirs["y"]}, base_name="base")


class _Forwards:
    """Counts forward passes of the bank's PEFT model, and records the per-row adapters
    (``adapter_names``) its first LoRA layer is given in each (None: one adapter for all rows)."""

    def __init__(self, bank: AdapterBank) -> None:
        from peft.tuners.lora import LoraLayer

        self.calls: list[list[str] | None] = []
        lora = next(m for m in bank.peft.modules() if isinstance(m, LoraLayer))
        self.handles = [
            bank.peft.register_forward_pre_hook(lambda *a: self.calls.append(None)),
            lora.register_forward_pre_hook(self._names, with_kwargs=True),
        ]

    def _names(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.calls[-1] = kwargs.get("adapter_names")

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _steps(completions: list[Any]) -> int:
    """Forward passes a static batch takes: a prefill, then one per token chosen after it
    (an EOS ending a row is chosen but not counted in its completion tokens)."""
    return max(c.usage.completion_tokens + (c.finish_reason == "stop") for c in completions)


def test_mixed_batch_logits_equal_each_adapter_alone(bank: AdapterBank, dirs: dict[str, Path]) -> None:
    import torch

    from collab.experts import Expert

    tok = bank.tokenizer
    prompts = [tok(p).input_ids for p in PROMPTS[:4]]  # different lengths: left padding in the batch
    names = ["x", "y", "base", "x"]
    mixed = bank.session(prompts, names)
    alone = [bank.expert(n).session([p]) for n, p in zip(names, prompts)]
    for i, s in enumerate(alone):
        torch.testing.assert_close(mixed.logits[i], s.logits[0], atol=1e-5, rtol=1e-5)
    nxt = [int(t) for t in mixed.logits.argmax(-1)]  # one step further, through the KV cache
    mixed.feed(nxt)
    for i, s in enumerate(alone):
        s.feed([nxt[i]])
        torch.testing.assert_close(mixed.logits[i], s.logits[0], atol=1e-5, rtol=1e-5)
    # the base rows are the base model itself; each adapter's rows are that adapter (as merged on load)
    first = {n: bank.expert(n).session([prompts[0]]).logits[0] for n in ("base", "x", "y")}
    torch.testing.assert_close(first["base"], Expert.load(dirs["base"]).session([prompts[0]]).logits[0], atol=1e-5, rtol=1e-5)
    for n in ("x", "y"):
        torch.testing.assert_close(first[n], Expert.load(dirs[n]).session([prompts[0]]).logits[0], atol=1e-4, rtol=1e-4)
    assert min((first["x"] - first["y"]).abs().max(), (first["x"] - first["base"]).abs().max()) > 0.1  # the adapters matter


def test_greedy_mixed_batch_equals_each_row_alone_in_one_forward_per_step(bank: AdapterBank) -> None:
    names = ["x", "y", "base", "y", "x", "base"]
    reqs = [GenerationRequest.chat(p, max_tokens=m) for p, m in zip(PROMPTS, [12, 5, 9, 3, 7, 12])]
    alone = [bank.expert(n).generate(r) for n, r in zip(names, reqs)]
    assert len({a.text for a in alone}) > 3  # the adapters answer differently
    counter = _Forwards(bank)
    try:
        out = bank.generate_batch(reqs, names, drop_finished=False)
    finally:
        counter.close()
    assert [c.text for c in out] == [a.text for a in alone]
    assert [(c.usage.completion_tokens, c.finish_reason) for c in out] == [(a.usage.completion_tokens, a.finish_reason) for a in alone]
    assert len(counter.calls) == _steps(out)  # ONE forward per step for the whole mixed batch
    assert sorted(counter.calls[0] or []) == sorted(["x", "y", BASE, "y", "x", BASE])  # rows sorted by prompt length
    assert [c.trace["expert"] for c in out] == names and all(c.trace["mixed_batch"] for c in out)
    assert out[0].trace["adapter"] == "x" and out[2].trace["adapter"] == "base"


def test_finished_rows_leave_with_their_adapters(bank: AdapterBank) -> None:
    # rows of different lengths finish at different steps and leave the batch (Session.keep);
    # the rows left must keep their own adapters
    names = ["y", "x", "base", "x", "y"]
    reqs = [GenerationRequest.chat(p, max_tokens=m) for p, m in zip(PROMPTS, [2, 10, 4, 6, 12])]
    alone = [bank.expert(n).generate(r) for n, r in zip(names, reqs)]
    counter = _Forwards(bank)
    try:
        out = bank.generate_batch(reqs, names)  # drop_finished: rows leave as they end
    finally:
        counter.close()
    assert [c.text for c in out] == [a.text for a in alone]
    widths = [len(c) if c is not None else 1 for c in counter.calls]
    assert widths[0] == 5 and widths[-1] < 5 and widths == sorted(widths, reverse=True)
    # the same through a raw session: keep rows 4 and 1 (in that order), feed on
    tok = bank.tokenizer
    prompts = [tok(p).input_ids for p in PROMPTS[:5]]
    s = bank.session(prompts, names)
    s.keep([4, 1])
    assert s.adapters == ["y", "x"]
    s.feed([7, 9])
    for row, (i, t) in enumerate([(4, 7), (1, 9)]):
        one = bank.expert(names[i]).session([prompts[i]])
        one.feed([t])
        np.testing.assert_allclose(s.logits[row].numpy(), one.logits[0].numpy(), atol=1e-5, rtol=1e-5)


def test_rows_join_a_running_mixed_batch(bank: AdapterBank) -> None:
    from collab.decode import RequestRule

    first = [GenerationRequest.chat(p, max_tokens=m) for p, m in zip(PROMPTS[:3], [3, 9, 6])]
    later = [GenerationRequest.chat(p, max_tokens=m) for p, m in zip(PROMPTS[3:], [5, 8, 4])]
    adapter = {id(r): n for r, n in zip(first + later, ["x", "base", "y", "y", "x", "base"])}
    waiting = list(later)

    def admit(loop: Any) -> list[tuple[GenerationRequest, list[int]]]:
        if loop.step in (2, 4) and waiting:  # one joins at step 2, two at step 4
            n = 1 if loop.step == 2 else 2
            joining, waiting[:] = waiting[:n], waiting[n:]
            return [(r, bank.expert(adapter[id(r)]).encode(r)) for r in joining]
        return []

    done = {}
    for events in bank.decode(first, [adapter[id(r)] for r in first], RequestRule(first), admit=admit, adapter_of=lambda r: adapter[id(r)]):
        for e in events:
            if e.completion is not None:
                done[id(e.request)] = e.completion
    assert not waiting and len(done) == 6
    for r in first + later:
        assert done[id(r)].text == bank.expert(adapter[id(r)]).generate(r).text
        assert done[id(r)].trace["expert"] == adapter[id(r)]


class _KeywordRouter(Router):
    """Routes prompts with digits to x, 'capital' or 'Hello' to the base, the rest to y."""

    uses_encoder = False

    def __init__(self) -> None:
        super().__init__()
        self.experts = ["base", "x", "y"]

    def _predict_features(self, x: np.ndarray | None, prompts: list[str]) -> np.ndarray:
        def scores(p: str) -> list[float]:
            if any(c.isdigit() for c in p):
                return [0.1, 0.9, 0.2]
            return [0.9, 0.1, 0.2] if ("capital" in p or "Hello" in p) else [0.1, 0.2, 0.9]

        return np.array([scores(p) for p in prompts])


def test_routed_system_batches_rows_over_adapters(bank: AdapterBank, tiny_expert: Any) -> None:
    sys_ = RoutedSystem("auto", _KeywordRouter(), bank.experts)
    reqs = [GenerationRequest.chat(p, max_tokens=6) for p in PROMPTS]
    want = ["x", "x", "base", "x", "base", "y"]
    counter = _Forwards(bank)
    try:
        out = sys_.generate_batch(reqs)
    finally:
        counter.close()
    assert [c.trace["routed_to"] for c in out] == want
    assert [c.trace["expert_trace"]["expert"] for c in out] == want
    assert all(c.trace["expert_trace"]["mixed_batch"] for c in out)
    assert [c.text for c in out] == [bank.expert(n).generate(r).text for n, r in zip(want, reqs)]
    assert len(counter.calls) <= _steps(out)  # one batch for the three experts, not one per expert
    assert sorted(set(counter.calls[0] or [])) == [BASE, "x", "y"]
    # an expert outside the bank keeps its own batch
    mixed = RoutedSystem("auto", _KeywordRouter(), {"base": tiny_expert, "x": bank.expert("x"), "y": bank.expert("y")})
    out2 = mixed.generate_batch(reqs)
    assert [c.trace["routed_to"] for c in out2] == want
    assert "mixed_batch" not in out2[2].trace["expert_trace"] and out2[0].trace["expert_trace"]["mixed_batch"]
    assert [c.text for c in out2][:2] == [c.text for c in out][:2]


def test_spec_adapter_batch_builds_one_bank(tmp_path: Path, dirs: dict[str, Path], tiny_model_dir: Path) -> None:
    router = tmp_path / "router"
    constant_router(["base", "x", "y", "other"], [0.1, 0.2, 0.9, 0.3]).save(router)
    experts = f"  base: {{ref: {dirs['base']}}}\n  x: {{ref: {dirs['x']}}}\n  y: {{ref: {dirs['y']}}}\n  other: {{ref: {tiny_model_dir}}}\n"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(f"experts:\n{experts}systems:\n  auto: {{type: route, router: {router}, experts: [base, x, y, other], adapter_batch: true}}\n")
    spec = load_spec(spec_path)
    assert adapter_groups({n: spec.experts[n].ref for n in ("base", "x", "y", "other")}) == [["base", "x", "y"]]
    sys_ = spec.system("auto")
    views = [sys_.experts[n] for n in ("base", "x", "y")]
    assert all(isinstance(v, AdapterExpert) for v in views) and len({id(v.bank) for v in views}) == 1
    assert not isinstance(sys_.experts["other"], AdapterExpert)
    reqs = [GenerationRequest.chat(p, max_tokens=4) for p in PROMPTS[:2]]
    out = sys_.generate_batch(reqs)
    assert [c.trace["routed_to"] for c in out] == ["y", "y"] and all(c.trace["expert_trace"]["mixed_batch"] for c in out)
    assert [c.text for c in out] == [views[2].generate(r).text for r in reqs]
    # asking for it without two adapters of one base is an error that says why
    spec_path.write_text(f"experts:\n{experts}systems:\n  auto: {{type: route, router: {router}, experts: [base, x, y, other], adapter_batch: 1}}\n")
    with pytest.raises(SpecError, match=r"systems.auto.adapter_batch: expected true or false"):
        load_spec(spec_path)
    lone = tmp_path / "lone"
    constant_router(["x", "other"], [0.9, 0.1]).save(lone)
    spec_path.write_text(f"experts:\n{experts}systems:\n  auto: {{type: route, router: {lone}, experts: [x, other], adapter_batch: true}}\n")
    with pytest.raises(SpecError, match=r"systems.auto.adapter_batch: no experts .* LoRA adapters of one base"):
        load_spec(spec_path)


def test_server_batchers_share_the_bank_safely(bank: AdapterBank) -> None:
    """In the server each adapter's expert has its own batcher (continuous batching); the
    batchers' threads share the bank's model, one forward at a time, each with its adapter."""
    import threading

    from collab.server.batching import BatchedExpert, ExpertBatcher

    views = {n: BatchedExpert(ExpertBatcher(bank.expert(n), max_batch=4, max_wait_ms=5)) for n in ("base", "x", "y")}
    jobs = [(n, GenerationRequest.chat(p, max_tokens=m)) for p, m in zip(PROMPTS, [6, 9, 4, 8, 5, 7]) for n in ("x", "y", "base")]
    out: list[Any] = [None] * len(jobs)

    def one(i: int) -> None:
        n, r = jobs[i]
        out[i] = views[n].generate(r).text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for v in views.values():
            v.batcher.close()
    assert out == [bank.expert(n).generate(r).text for n, r in jobs]


class TestAdapterExpertContract(SystemContract):
    """An adapter of the bank is a System like any expert (scoring, streaming, sampling included)."""

    @pytest.fixture
    def system(self, bank: AdapterBank) -> Any:
        return bank.expert("x")


class TestRoutedOverBankContract(SystemContract):
    """A route system over the bank's experts (its generate_batch takes the mixed path)."""

    @pytest.fixture
    def system(self, bank: AdapterBank) -> Any:
        return RoutedSystem("auto", _KeywordRouter(), bank.experts)
