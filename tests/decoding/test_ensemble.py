"""Ensembles (``type: ensemble``): answer-level (vote, best_of) and token-level (logits,
contrast) over tiny random experts that share a tokenizer. Each invariant is pinned
against a member alone or a direct computation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from collab.errors import SpecError
from collab.spec import load_spec
from collab.system import BaseSystem, Completion, GenerationRequest, Usage, collect_stream
from decoding.ensemble import (
    AnswerEnsemble,
    EnsembleError,
    TokenEnsemble,
    extract_answer,
    weights_from_table,
)
from decoding.system import TokenizerMismatchError
from tests.contract import SystemContract

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["What is 2 + 2?", "Reverse the list [1, 2, 3].", "Hello there!", "The capital of France is"]


def chat(text: str, **kw: Any) -> GenerationRequest:
    return GenerationRequest.chat(text, max_tokens=kw.pop("max_tokens", 10), **kw)


@pytest.fixture(scope="module")
def twin(tiny_model_dir: Path) -> Any:
    """The tiny expert loaded a second time under another name: the same answers."""
    from collab.experts import Expert

    return Expert.load(tiny_model_dir, name="twin")


class Fixed(BaseSystem):
    """A member that always answers ``text`` (for the vote's bookkeeping)."""

    def __init__(self, name: str, text: str) -> None:
        self.name, self.text = name, text

    def generate(self, request: GenerationRequest) -> Completion:
        return Completion(self.text, usage=Usage(5, 3), trace={"system": self.name})


# ------------------------------------------------------------ one member
@pytest.mark.parametrize("mode", ["vote", "best_of", "logits"])
def test_an_ensemble_of_one_member_equals_that_member(mode: str, tiny_expert: Any) -> None:
    ens = TokenEnsemble([tiny_expert]) if mode == "logits" else AnswerEnsemble([tiny_expert], mode)
    for p in PROMPTS:
        for kw in ({}, {"temperature": 0.9, "top_p": 0.9, "seed": 3}):
            req = chat(p, **kw)
            want = tiny_expert.generate(req)
            got = ens.generate(req)
            assert (got.text, got.finish_reason, got.usage) == (want.text, want.finish_reason, want.usage), (mode, p, kw)
            assert collect_stream(ens.stream(req)).text == want.text
    batch = ens.generate_batch([chat(p) for p in PROMPTS])
    assert [c.text for c in batch] == [tiny_expert.generate(chat(p)).text for p in PROMPTS]


def test_contrast_with_lambda_zero_equals_the_expert(tiny_expert: Any, assistants: list[Any]) -> None:
    for alpha in (0.0, 0.1):
        ens = TokenEnsemble([tiny_expert, assistants[0]], "contrast", lam=0.0, alpha=alpha)
        for p in PROMPTS:
            assert ens.generate(chat(p)).text == tiny_expert.generate(chat(p)).text
    sampled = TokenEnsemble([tiny_expert, assistants[0]], "contrast", lam=0.0, alpha=0.0)
    for p in PROMPTS:
        req = chat(p, temperature=0.8, seed=7)
        assert sampled.generate(req).text == tiny_expert.generate(req).text  # the same sampler, the same distribution


def test_logits_with_weights_one_zero_equals_the_first_member(tiny_expert: Any, assistants: list[Any]) -> None:
    ens = TokenEnsemble([tiny_expert, assistants[0]], "logits", [1.0, 0.0])
    for p in PROMPTS:
        req = chat(p, max_tokens=16)
        want, got = tiny_expert.generate(req), ens.generate(req)
        ids = tiny_expert.tokenizer(want.text, add_special_tokens=False).input_ids
        assert tiny_expert.tokenizer(got.text, add_special_tokens=False).input_ids == ids
        assert (got.usage, got.finish_reason) == (want.usage, want.finish_reason)
    reqs = [chat(p, max_tokens=16) for p in PROMPTS]
    assert [c.text for c in ens.generate_batch(reqs)] == [c.text for c in tiny_expert.generate_batch(reqs)]


# ----------------------------------------------------- token level, direct
def _reference_greedy(ens: TokenEnsemble, req: GenerationRequest, n: int) -> str:
    """Greedy decoding by recomputing every model over the whole sequence at each step
    (no cache) and combining their log-probabilities as the ensemble says it does."""
    import torch

    driver = ens.driver
    ids = driver.encode(req)
    out: list[int] = []
    for _ in range(n):
        with torch.inference_mode():
            logps = [torch.log_softmax(m.model(input_ids=torch.tensor([ids + out])).logits[:, -1].float(), dim=-1) for m in ens.models]
        tok = int(ens.combine(logps).argmax(dim=-1))
        if tok in driver.eos_token_ids:
            break
        out.append(tok)
    return driver.tokenizer.decode(out, skip_special_tokens=True)


def test_token_level_modes_equal_a_direct_computation(tiny_expert: Any, assistants: list[Any]) -> None:
    import torch

    a0, a1 = assistants
    mixture = TokenEnsemble([tiny_expert, a0, a1], "logits", [0.5, 0.3, 0.2])
    logps = [torch.log_softmax(torch.randn(2, 7), dim=-1) for _ in range(3)]
    want = torch.log(0.5 * logps[0].exp() + 0.3 * logps[1].exp() + 0.2 * logps[2].exp())
    torch.testing.assert_close(mixture.combine(logps), want)  # probabilities averaged, then the log
    systems = [
        mixture,
        TokenEnsemble([tiny_expert, a0], "contrast", lam=0.7, alpha=0.1),
        TokenEnsemble([tiny_expert, a0], "contrast", lam=0.7, alpha=0.0),
        TokenEnsemble([tiny_expert, a0, a1], "contrast", lam=1.0),  # proxy-tuning: base + (expert - anti)
    ]
    for ens in systems:
        for p in PROMPTS:
            req = chat(p, max_tokens=8)
            assert ens.generate(req).text == _reference_greedy(ens, req, req.max_tokens), (ens.mode, ens.names, p)
    # contrast's plausibility cut: only tokens with p_expert >= alpha * max p_expert remain
    cd = systems[1]
    scores = cd.combine(logps[:2])
    keep = logps[0] >= logps[0].max(dim=-1, keepdim=True).values + math.log(0.1)
    assert torch.isinf(scores[~keep]).all() and torch.allclose(scores[keep], (logps[0] - 0.7 * logps[1])[keep])


def test_token_level_streams_batches_and_reports_cost(tiny_expert: Any, assistants: list[Any]) -> None:
    ens = TokenEnsemble([tiny_expert, *assistants], "logits", [1, 2, 1], name="mix")
    reqs = [chat(p, max_tokens=12) for p in PROMPTS]
    alone = [ens.generate(r) for r in reqs]
    assert [c.text for c in ens.generate_batch(reqs)] == [c.text for c in alone]
    for r, c in zip(reqs, alone):
        streamed = list(ens.stream(r))
        assert "".join(ch.text for ch in streamed) == c.text and streamed[-1].trace == c.trace
        cost = c.trace["cost"]
        per = c.usage.prompt_tokens + c.usage.completion_tokens
        assert cost["members"] == 3 and cost["tokens"] == 3 * per and cost["by_model"] == {"tiny": per, "asst0": per, "asst1": per}
        assert c.trace["mode"] == "logits" and c.trace["weights"] == {"tiny": 1.0, "asst0": 2.0, "asst1": 1.0}
    seeded = chat(PROMPTS[0], max_tokens=12, temperature=1.0, seed=11)
    assert ens.generate(seeded).text == ens.generate(seeded).text


def test_token_level_loglikelihood_is_the_combined_distributions(tiny_expert: Any, assistants: list[Any]) -> None:
    import torch

    pairs = [("Question: What is 2 + 2?\nAnswer:", " 4"), ("The capital of France is", " Paris."), ("", "Hello there")]
    one = TokenEnsemble([tiny_expert])
    for (ll, greedy), (want, want_greedy) in zip(one.loglikelihood_batch(pairs), tiny_expert.loglikelihood_batch(pairs)):
        assert ll == pytest.approx(want, abs=1e-3) and greedy == want_greedy
    mix = TokenEnsemble([tiny_expert, assistants[0]], "logits", [0.25, 0.75])
    for (ctx, cont), (ll, _) in zip(pairs, mix.loglikelihood_batch(pairs, batch_size=2)):
        c_ids, x_ids = tiny_expert._split_context(ctx, cont)
        seq = torch.tensor([c_ids + x_ids])
        with torch.inference_mode():
            probs = [torch.softmax(m.model(input_ids=seq).logits[0].float(), dim=-1) for m in mix.models]
        p = 0.25 * probs[0] + 0.75 * probs[1]  # (T, V)
        pos = torch.arange(len(c_ids) - 1, len(c_ids) + len(x_ids) - 1)
        want = float(torch.log(p[pos, torch.tensor(x_ids)]).sum())
        assert ll == pytest.approx(want, abs=1e-3)


def test_members_without_a_shared_tokenizer_name_both_vocabularies(tiny_expert: Any, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from collab.experts import Expert
    from tests.tiny import make_tokenizer

    tok = make_tokenizer(vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "other"))
    tok.save_pretrained(str(tmp_path / "other"))
    other = Expert.load(tmp_path / "other", name="other")
    for args in (([tiny_expert, other], "logits"), ([tiny_expert, other], "contrast")):
        with pytest.raises(TokenizerMismatchError) as e:
            TokenEnsemble(*args)
        msg = str(e.value)
        assert f"expert 'tiny' ({len(tiny_expert.tokenizer)} tokens" in msg and f"expert 'other' ({len(tok)} tokens" in msg
        assert f"ensemble mode '{args[1]}'" in msg
    # answer-level modes take members of any vocabularies
    assert AnswerEnsemble([tiny_expert, other], "vote").generate(chat("Hello")).trace["members"] == ["tiny", "other"]


# ------------------------------------------------------------ answer level
def test_vote_picks_the_majority_and_breaks_ties_as_configured(tiny_expert: Any, twin: Any, assistants: list[Any]) -> None:
    a0, a1 = assistants
    req = chat(PROMPTS[0])
    texts = {e.name: e.generate(req).text for e in (tiny_expert, a0, a1)}
    assert len(set(texts.values())) == 3, texts  # the tiny models disagree on this prompt
    # two identical answers beat the third, even when the third breaks ties
    c = AnswerEnsemble([a0, tiny_expert, twin], "vote", tie_break="asst0").generate(req)
    assert c.text == texts["tiny"] and c.trace["chosen"] == "tiny" and c.trace["tie"] is False
    assert sorted(v["weight"] for v in c.trace["votes"]) == [1.0, 2.0]
    # three different answers: the named member; by default the first
    assert AnswerEnsemble([tiny_expert, a0, a1], "vote", tie_break="asst1").generate(req).text == texts["asst1"]
    default = AnswerEnsemble([tiny_expert, a0, a1], "vote").generate(req)
    assert default.text == texts["tiny"] and default.trace["tie"] is True
    # ... or the highest-weighted one; weights also outvote a majority
    assert AnswerEnsemble([tiny_expert, a0, a1], "vote", [1, 1, 2]).generate(req).text == texts["asst1"]
    assert AnswerEnsemble([a0, tiny_expert, twin], "vote", [3, 1, 1]).generate(req).text == texts["asst0"]
    # cost: every member's prompt and answer
    usage = {e.name: e.generate(req).usage.total_tokens for e in (a0, tiny_expert, twin)}
    assert c.trace["cost"] == {"members": 3, "tokens": sum(usage.values()), "by_model": usage}


def test_vote_reads_answers_as_the_benchmark_does() -> None:
    req = chat("What is 40 + 2?")
    members = [Fixed("a", "The answer is 42."), Fixed("b", "42"), Fixed("c", "I think 41"), Fixed("d", "no idea")]
    c = AnswerEnsemble(members, "vote", answer="number", tie_break="c").generate(req)
    assert c.text == "The answer is 42." and c.trace["chosen"] == "a" and c.trace["votes"] == [{"answer": "42", "weight": 2.0}, {"answer": "41", "weight": 1.0}]
    # with exact matching every answer differs: the tie-breaker's
    assert AnswerEnsemble(members, "vote", tie_break="c").generate(req).text == "I think 41"
    # nobody readable: the tie-breaker's text
    assert AnswerEnsemble([Fixed("a", "?"), Fixed("b", "...")], "vote", answer="number", tie_break="b").generate(req).text == "..."
    # streaming gives the chosen answer at the end, with the trace
    chunks = list(AnswerEnsemble(members, "vote", answer="number").stream(req))
    assert [ch.text for ch in chunks] == ["The answer is 42."] and chunks[-1].trace["chosen"] == "a"


def test_answer_extractors() -> None:
    sort = chat("Sort these numbers from smallest to largest: 5, 3, 90, 1")
    assert extract_answer("skill", "1, 3, 5, 90 and done (4 numbers)", sort) == ("1", "3", "5", "90")
    assert extract_answer("skill", "1, 3, 5", sort) is None
    assert extract_answer("skill", "It is 1221.0, since 892 + 329", chat("What is 892 + 329?")) == ("1221",)
    assert extract_answer("number", "first 3, then $1,234.", chat("q")) == "1234"
    assert extract_answer("first_number", "first 3, then 1234.", chat("q")) == "3"
    mc = chat("Which is a planet?\nA. Sun\nB. Mars\nC. Moon\nAnswer with the letter of the correct choice (A, B, C) only.")
    assert extract_answer("choice", "The answer is (B).", mc) == "B" and extract_answer("choice", "D", mc) is None
    assert extract_answer("exact", "  Paris.\n", chat("q")) == extract_answer("exact", "paris", chat("q")) == "paris"
    with pytest.raises(EnsembleError, match="answer: expected one of exact, number"):
        extract_answer("letters", "A", chat("q"))


def _mean_logprob(judge: Any, req: GenerationRequest, text: str) -> float:
    return judge.loglikelihood(judge.render(req), text) / len(judge.tokenizer(text, add_special_tokens=False).input_ids)


def test_best_of_picks_the_answer_the_judge_scores_highest(tiny_expert: Any, assistants: list[Any]) -> None:
    a0, a1 = assistants
    for p in PROMPTS:
        req = chat(p)
        texts = {e.name: e.generate(req).text for e in (a0, a1)}
        # an external judge: every answer under the tiny expert
        judged = AnswerEnsemble([a0, a1], "best_of", judge=tiny_expert).generate(req)
        want = {n: _mean_logprob(tiny_expert, req, t) for n, t in texts.items() if t}
        best = max(want, key=lambda n: want[n])
        assert judged.trace["chosen"] == best and judged.text == texts[best]
        for a in judged.trace["answers"]:
            assert a["score"] == pytest.approx(want[a["expert"]], abs=1e-4)
        assert judged.trace["cost"]["by_model"]["judge:tiny"] > 0
        # judge: self, each member's own confidence
        own = AnswerEnsemble([a0, a1], "best_of", judge="self").generate(req)
        mine = {e.name: _mean_logprob(e, req, texts[e.name]) for e in (a0, a1) if texts[e.name]}
        assert own.trace["chosen"] == max(mine, key=lambda n: mine[n])
    batch = AnswerEnsemble([a0, a1], "best_of", judge=tiny_expert).generate_batch([chat(p) for p in PROMPTS])
    assert [c.text for c in batch] == [AnswerEnsemble([a0, a1], "best_of", judge=tiny_expert).generate(chat(p)).text for p in PROMPTS]


def test_answer_level_loglikelihood_is_the_weighted_mean(tiny_expert: Any, assistants: list[Any]) -> None:
    pairs = [("Question: What is 2 + 2?\nAnswer:", " 4"), ("The capital of France is", " Paris.")]
    ens = AnswerEnsemble([tiny_expert, assistants[0]], "vote", [3, 1])
    for (ctx, cont), (ll, _) in zip(pairs, ens.loglikelihood_batch(pairs)):
        want = 0.75 * tiny_expert.loglikelihood(ctx, cont) + 0.25 * assistants[0].loglikelihood(ctx, cont)
        assert ll == pytest.approx(want, abs=1e-4)
    assert ens.loglikelihood(*pairs[0]) == pytest.approx(ens.loglikelihood_batch(pairs[:1])[0][0])


# ---------------------------------------------------------------- weights
def test_weights_from_a_routing_table_equal_the_members_mean_scores(tmp_path: Path) -> None:
    rows = [
        {"id": "q1", "task": "math", "prompt": "1+1", "scores": {"a": 1.0, "b": 0.0, "c": 0.5}},
        {"id": "q2", "task": "math", "prompt": "2+2", "scores": {"a": 1.0, "b": 1.0, "c": 0.0}},
        {"id": "q3", "task": "lists", "prompt": "sort 2 1", "scores": {"a": 0.0, "b": 1.0, "c": 0.25}},
    ]
    path = tmp_path / "table.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert weights_from_table(path, ["c", "a"]) == pytest.approx([0.75 / 3, 2 / 3])
    assert weights_from_table(path, ["a", "b"], task="math") == pytest.approx([1.0, 0.5])
    with pytest.raises(EnsembleError, match="no scores for 'z'"):
        weights_from_table(path, ["a", "z"])
    with pytest.raises(EnsembleError, match="no rows of task 'code'"):
        weights_from_table(path, ["a"], task="code")


# ------------------------------------------------------------------- spec
def _write_spec(root: Path, dirs: dict[str, Path], systems: dict[str, Any], remote: bool = True) -> Path:
    far = {"far": {"url": "http://127.0.0.1:9/v1", "model": "m"}} if remote else {}
    data = {"experts": {**{n: {"ref": str(d)} for n, d in dirs.items()}, **far}, "systems": systems}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def dirs(tiny_model_dir: Path, assistant_dirs: list[Path]) -> dict[str, Path]:
    return {"base": tiny_model_dir, "a0": assistant_dirs[0], "a1": assistant_dirs[1]}


def test_spec_builds_every_mode(tmp_path: Path, dirs: dict[str, Path], tiny_expert: Any, assistants: list[Any]) -> None:
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps({"id": str(i), "prompt": "p", "scores": {"base": s, "a0": 1 - s, "a1": 0.5}}) + "\n" for i, s in enumerate([0.0, 1.0, 1.0])))
    systems = {
        "vote": {"type": "ensemble", "mode": "vote", "experts": ["base", "a0", "a1"], "answer": "number", "tie_break": "a1"},
        "tab": {"type": "ensemble", "mode": "vote", "experts": ["base", "a0", "a1"], "weights": {"from_table": "t.jsonl"}},
        "named": {"type": "ensemble", "mode": "vote", "experts": ["base", "a0"], "weights": {"a0": 2, "base": 1}},
        "best": {"type": "ensemble", "mode": "best_of", "experts": ["a0", "a1", "far"], "judge": "base"},
        "mix": {"type": "ensemble", "mode": "logits", "experts": ["base", "a0"], "weights": [1, 0]},
        "cd": {"type": "ensemble", "mode": "contrast", "expert": "base", "anti": "a0", "lambda": 0},
        "proxy": {"type": "ensemble", "mode": "contrast", "base": "a1", "expert": "base", "anti": "a0"},
    }
    spec = load_spec(_write_spec(tmp_path, dirs, systems))
    vote = spec.system("vote")
    assert isinstance(vote, AnswerEnsemble) and (vote.mode, vote.answer, vote.tie_break) == ("vote", "number", "a1")
    assert vote.members[0] is spec.system("base")  # the spec's experts, shared
    assert spec.system("tab").weights == pytest.approx(weights_from_table(table, ["base", "a0", "a1"]))
    assert spec.system("named").weights == [1.0, 2.0]
    best = spec.system("best")
    assert best.judge is spec.system("base") and [m.name for m in best.members] == ["a0", "a1", "far"]
    req = chat(PROMPTS[0])
    assert spec.system("mix").generate(req).text == tiny_expert.generate(req).text
    assert spec.system("cd").generate(req).text == tiny_expert.generate(req).text
    proxy = spec.system("proxy")
    assert proxy.names == ["a1", "base", "a0"] and proxy.lam == 1.0 and proxy.trace_for(req)["roles"] == {"base": "a1", "expert": "base", "anti": "a0"}


@pytest.mark.parametrize(
    ("system", "key", "message"),
    [
        ({"experts": ["base"]}, "systems.e.mode", "missing; expected one of vote, best_of, logits, contrast"),
        ({"mode": "average", "experts": ["base"]}, "systems.e.mode", "unknown mode 'average'"),
        ({"mode": "vote", "experts": ["base", "nobody"]}, "systems.e.experts[1]", "unknown expert 'nobody'"),
        ({"mode": "vote", "experts": []}, "systems.e.experts", "non-empty list"),
        ({"mode": "vote", "experts": ["base", "base"]}, "systems.e.experts", "listed twice"),
        ({"mode": "vote", "experts": ["base", "a0"], "weights": [1]}, "systems.e.weights", "expected 2 weights (one per expert: base, a0), found 1"),
        ({"mode": "vote", "experts": ["base", "a0"], "weights": [0, 0]}, "systems.e.weights", "not all 0"),
        ({"mode": "vote", "experts": ["base", "a0"], "weights": [1, -1]}, "systems.e.weights", ">= 0"),
        ({"mode": "vote", "experts": ["base", "a0"], "weights": {"base": 1}}, "systems.e.weights", "a weight for each member"),
        ({"mode": "vote", "experts": ["base"], "weights": {"from_table": "none.jsonl"}}, "systems.e.weights.from_table", "'none.jsonl' not found"),
        ({"mode": "vote", "experts": ["base"], "answer": "letters"}, "systems.e.answer", "expected one of exact, number"),
        ({"mode": "vote", "experts": ["base", "a0"], "tie_break": "a1"}, "systems.e.tie_break", "one of the members (base, a0)"),
        ({"mode": "vote", "experts": ["base"], "judge": "a0"}, "systems.e.judge", "belongs to mode best_of"),
        ({"mode": "best_of", "experts": ["base"], "judge": "nobody"}, "systems.e.judge", "expected 'self' or an expert"),
        ({"mode": "logits", "experts": ["base", "far"]}, "systems.e.experts[1]", "remote endpoint"),
        ({"mode": "logits", "experts": ["base"], "lambda": 1}, "systems.e.lambda", "belongs to mode contrast"),
        ({"mode": "contrast", "expert": "base"}, "systems.e.anti", "missing"),
        ({"mode": "contrast", "expert": "base", "anti": "base"}, "systems.e.anti", "the expert itself"),
        ({"mode": "contrast", "expert": "base", "anti": "a0", "lambda": -1}, "systems.e.lambda", "a number >= 0"),
        ({"mode": "contrast", "expert": "base", "anti": "a0", "alpha": 1}, "systems.e.alpha", "[0, 1)"),
        ({"mode": "contrast", "experts": ["base", "a0"]}, "systems.e.experts", "belongs to mode vote or best_of or logits"),
    ],
)
def test_spec_errors_name_the_file_and_key(tmp_path: Path, dirs: dict[str, Path], system: dict[str, Any], key: str, message: str) -> None:
    path = _write_spec(tmp_path, dirs, {"e": {"type": "ensemble", **system}})
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value).startswith(f"{path}: {key}: ") and message in str(e.value), str(e.value)


def test_weights_from_a_table_missing_a_member_is_a_spec_error(tmp_path: Path, dirs: dict[str, Path]) -> None:
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": "1", "prompt": "p", "scores": {"base": 1.0}}) + "\n")
    path = _write_spec(tmp_path, dirs, {"e": {"type": "ensemble", "mode": "vote", "experts": ["base", "a0"], "weights": {"from_table": "t.jsonl"}}})
    with pytest.raises(SpecError, match=r"systems\.e\.weights\.from_table: .*t\.jsonl: the table has no scores for 'a0'"):
        load_spec(path)


def test_the_example_spec_validates() -> None:
    spec = load_spec(ROOT / "examples" / "ensembles.yaml")
    modes = {spec.systems[n]["mode"] for n in spec.systems if spec.systems[n]["type"] == "ensemble"}
    assert modes == {"vote", "best_of", "logits", "contrast"}


# ------------------------------------------------------------------ evals
def test_collab_eval_reports_the_cost(tiny_expert: Any, assistants: list[Any]) -> None:
    from evals.compare import format_cell
    from evals.runner import evaluate

    ens = TokenEnsemble([tiny_expert, *assistants], "logits", name="mix")
    res = evaluate(ens, "skill:arith", limit=2, max_tokens=4, progress=False, batch_size=2)
    own = res.tokens["total"]
    assert res.cost == {"tokens": 3 * own, "per_example": 3 * own / 2, "ratio": 3.0}
    assert "cost x3.0" in format_cell(res.summary())
    single = evaluate(tiny_expert, "skill:arith", limit=2, max_tokens=4, progress=False)
    assert single.cost is None and "cost" not in format_cell(single.summary())


# ------------------------------------------------------------------ serve
def test_served_ensembles_answer_and_stream_with_the_trace(tmp_path: Path, dirs: dict[str, Path]) -> None:
    import openai

    from collab.server import CollabServer, ServeOptions, create_app
    from tests.server.helpers import Running

    systems = {
        "vote": {"type": "ensemble", "mode": "vote", "experts": ["base", "a0", "a1"], "tie_break": "a0"},
        "mix": {"type": "ensemble", "mode": "logits", "experts": ["base", "a0", "a1"]},
    }
    spec = load_spec(_write_spec(tmp_path, dirs, systems, remote=False))
    server = CollabServer.from_spec(spec, ServeOptions(max_wait_ms=20))
    server.load()
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    try:
        with Running(create_app(server)) as running:
            client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=60)
            for name in systems:
                want = spec.system(name).generate(chat(msgs[0]["content"], max_tokens=12))
                r = client.chat.completions.create(model=name, messages=msgs, max_tokens=12)
                assert r.choices[0].message.content == want.text
                trace = r.model_extra["collab"]
                assert trace["mode"] == systems[name]["mode"] and trace["cost"] == want.trace["cost"]
                chunks = list(client.chat.completions.create(model=name, messages=msgs, max_tokens=12, stream=True))
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    finally:
        server.close()


# ---------------------------------------------------------------- contract
class TestVoteContract(SystemContract):
    @pytest.fixture
    def system(self, tiny_expert: Any, assistants: list[Any]) -> Any:
        return AnswerEnsemble([tiny_expert, *assistants], "vote", name="vote")


class TestBestOfContract(SystemContract):
    @pytest.fixture
    def system(self, tiny_expert: Any) -> Any:
        return AnswerEnsemble([tiny_expert], "best_of", judge="self", name="best")


class TestLogitsContract(SystemContract):
    @pytest.fixture
    def system(self, tiny_expert: Any, assistants: list[Any]) -> Any:
        return TokenEnsemble([tiny_expert, *assistants], "logits", name="mix")


class TestContrastContract(SystemContract):
    @pytest.fixture
    def system(self, tiny_expert: Any, assistants: list[Any]) -> Any:
        return TokenEnsemble([tiny_expert, assistants[0]], "contrast", lam=0.3, name="cd")


class TestProxyContract(SystemContract):
    @pytest.fixture
    def system(self, tiny_expert: Any, assistants: list[Any]) -> Any:
        return TokenEnsemble([tiny_expert, *assistants], "contrast", lam=1.0, name="proxy")


# ------------------------------------------------------------- real models
@pytest.mark.slow
def test_real_zoo_ensembles() -> None:
    """SmolLM2 and two of its domain experts: every mode answers, a one-member ensemble
    equals the member, and Gemma (another tokenizer) is refused by a token-level mode."""
    from collab.experts import Expert

    smol = Expert.load("zoo:smollm2-135m-instruct", name="smol")
    arith = Expert.load("zoo:smol-arith", name="arith")
    lists = Expert.load("zoo:smol-lists", name="lists")
    req = chat("What is 312 + 429?", max_tokens=8)
    assert TokenEnsemble([arith]).generate(req).text == arith.generate(req).text
    assert TokenEnsemble([arith, lists], "logits", [1, 0]).generate(req).text == arith.generate(req).text
    for ens in (
        AnswerEnsemble([smol, arith, lists], "vote", answer="skill"),
        AnswerEnsemble([smol, arith, lists], "best_of", judge=smol),
        TokenEnsemble([smol, arith, lists], "logits"),
        TokenEnsemble([arith, smol], "contrast", lam=0.5),
        TokenEnsemble([arith, lists, smol], "contrast"),
    ):
        c = ens.generate(req)
        assert c.usage.completion_tokens <= 8 and c.trace["cost"]["tokens"] >= c.usage.total_tokens
    gemma = Expert.load("zoo:gemma3-270m", name="gemma")
    with pytest.raises(TokenizerMismatchError, match="expert 'gemma'"):
        TokenEnsemble([smol, gemma])
    both = AnswerEnsemble([smol, gemma], "vote", answer="choice")
    ll = both.loglikelihood("Question: Which is a planet?\nAnswer:", " Mars")
    assert ll == pytest.approx(0.5 * smol.loglikelihood("Question: Which is a planet?\nAnswer:", " Mars") + 0.5 * gemma.loglikelihood("Question: Which is a planet?\nAnswer:", " Mars"), abs=1e-3)
