"""Speculative decoding: the loop's multi-token steps and per-row rollback, greedy
identity with the verifier (batch 1 and 4, with and without stop strings, lookup
and model drafters), the sampled distribution, streaming, the trace, adaptive
draft lengths, the spec type and its errors, and the System contract."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from collab import decode
from collab.decode import Session
from collab.errors import SpecError
from collab.experts import Expert
from collab.spec import load_spec
from collab.system import GenerationRequest, collect_stream
from decoding.speculative import (
    LOOKUP,
    SpeculativeConfig,
    SpeculativeConfigError,
    SpeculativeDecoder,
    best_gamma,
    lookup_draft,
)
from decoding.system import TokenizerMismatchError
from tests.contract import SystemContract

CHAT = [
    "What is 2 + 2?",
    "The capital of France is",
    "Reverse the list [1, 2, 3].",
    "Count from 1 to 30, separated by commas.",
    "Hello there! How can I help you today?",
    "def add(a, b):",
]
RAW = ["0 1 2 3 4 5 6 7 8 9 10 11 12", "The capital of Italy is Rome. The capital of France is"]
MAX_TOKENS = 32


def _scaled(expert: Expert, factor: float, name: str) -> Expert:
    model = copy.deepcopy(expert.model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return Expert(model, expert.tokenizer, name=name)


def _perturbed(expert: Expert, scale: float, name: str, seed: int = 0) -> Expert:
    """A copy of ``expert`` with Gaussian noise on every weight: a drafter that agrees often, not always."""
    model = copy.deepcopy(expert.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return Expert(model, expert.tokenizer, name=name)


@pytest.fixture(scope="module")
def verifier(tiny_expert: Expert) -> Expert:
    """The tiny model at half its weights: answers vary by prompt and repeat themselves
    now and then, so prompt lookup has something to find."""
    return _scaled(tiny_expert, 0.5, "verifier")


@pytest.fixture(scope="module")
def drafter(verifier: Expert) -> Expert:
    return _perturbed(verifier, 0.05, "drafter")


def requests(**kw: Any) -> list[GenerationRequest]:
    kw.setdefault("max_tokens", MAX_TOKENS)
    return [GenerationRequest.chat(p, **kw) for p in CHAT] + [GenerationRequest(prompt=p, **kw) for p in RAW]


def _stop_for(text: str) -> str:
    """Two characters from the middle of ``text`` (as the System contract picks them)."""
    at = [i for i in range(2, len(text) - 2) if not text[i : i + 2].isspace() and "\ufffd" not in text[i : i + 2]]
    assert at, f"no stop string can be picked from {text!r}"
    i = at[len(at) // 2]
    return text[i : i + 2]


# ---------------------------------------------------------------- the loop
def _full_logits(expert: Expert, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return expert.model(input_ids=torch.tensor([ids])).logits[0].float()


def test_session_drop_forgets_a_different_number_of_tokens_per_row(tiny_expert: Expert) -> None:
    tok = tiny_expert.tokenizer
    prompts = [tok("The capital of France is").input_ids, tok("What is 2 + 2? It").input_ids, tok("Hello").input_ids]
    s = Session(tiny_expert, prompts)
    s.feed([[5, 17, 23, 30], [42, 43], [7, 8, 9, 10]], all_logits=True)
    s.drop([3, 0, 4])  # row 0 keeps one drafted token, row 1 both, row 2 none
    assert s.lengths == [len(prompts[0]) + 1, len(prompts[1]) + 2, len(prompts[2])]
    fed = [[11, 12], [13], [14]]
    s.feed(fed, all_logits=True)
    kept = [[5, 11, 12], [42, 43, 13], [14]]
    for i, (p, k) in enumerate(zip(prompts, kept)):
        ref = _full_logits(tiny_expert, p + k)
        torch.testing.assert_close(s.logits[i], ref[-1], atol=1e-4, rtol=1e-4)
        n = len(fed[i])
        assert s.chunk_logits is not None
        torch.testing.assert_close(s.chunk_logits[i, -n:], ref[-n:], atol=1e-4, rtol=1e-4)
    # columns that no row uses any more are cropped from the cache
    width = s.mask.shape[1]
    s.drop([2, 1, 1])  # the last two columns held 11, 12 / pad, 13 / pad, 14
    assert s.mask.shape[1] == width - 2 and s.lengths == [len(prompts[0]) + 1, len(prompts[1]) + 2, len(prompts[2])]
    with pytest.raises(ValueError, match="cannot drop"):
        s.drop([0, 0, 999])


class TwoAtATime:
    """Greedy, two tokens per step: the rule feeds the first to the session to find the
    second, and the loop catches the session up on the second."""

    def __call__(self, logits: torch.Tensor, loop: decode.Loop) -> list[list[int]]:
        first = logits.argmax(-1).tolist()
        active = [not f for f in loop.finished]
        second = loop.session.feed([[t] if a else [] for t, a in zip(first, active)]).argmax(-1).tolist()
        return [[a, b] for a, b in zip(first, second)]


def test_loop_takes_several_tokens_per_step(tiny_expert: Expert) -> None:
    reqs = [GenerationRequest.chat(p, max_tokens=n) for p, n in zip(CHAT[:4], (9, 10, 16, 3))]
    plain = [tiny_expert.generate(r) for r in reqs]
    two = decode.generate_batch(tiny_expert, reqs, TwoAtATime())
    assert [c.text for c in two] == [c.text for c in plain]
    assert [c.usage.completion_tokens for c in two] == [c.usage.completion_tokens for c in plain]  # max_tokens cuts inside a step
    stop = _stop_for(plain[2].text)
    cut = decode.generate(tiny_expert, GenerationRequest.chat(CHAT[2], max_tokens=16, stop=[stop]), TwoAtATime())
    assert cut.text == plain[2].text[: plain[2].text.find(stop)] and cut.finish_reason == "stop"


# ------------------------------------------------------- greedy identity
@pytest.mark.parametrize("kind", [LOOKUP, "model"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("with_stop", [False, True])
def test_greedy_output_is_the_verifiers(verifier: Expert, drafter: Expert, kind: str, batch: int, with_stop: bool) -> None:
    reqs = requests()
    plain = [verifier.generate(r) for r in reqs]
    if with_stop:
        reqs = [GenerationRequest(messages=r.messages, prompt=r.prompt, max_tokens=MAX_TOKENS, stop=[_stop_for(c.text)]) for r, c in zip(reqs, plain)]
        plain = [verifier.generate(r) for r in reqs]
        assert all(c.finish_reason == "stop" for c in plain)
    sd = SpeculativeDecoder(verifier, LOOKUP if kind == LOOKUP else drafter, SpeculativeConfig(gamma=4))
    if batch == 1:
        out = [sd.generate(r) for r in reqs]
    else:
        out = [c for start in range(0, len(reqs), batch) for c in sd.generate_batch(reqs[start : start + batch])]
    assert [c.text for c in out] == [c.text for c in plain]
    assert [c.finish_reason for c in out] == [c.finish_reason for c in plain]
    assert [c.usage.completion_tokens for c in out] == [c.usage.completion_tokens for c in plain]
    # the check is not vacuous: drafts were made, some kept, and verifier passes saved
    assert sum(c.trace["accepted"] for c in out) >= 5
    assert sum(c.trace["verifier_passes"] for c in out) < sum(c.usage.completion_tokens + 1 for c in out)


def test_generate_equals_generate_batch(verifier: Expert, drafter: Expert) -> None:
    sd = SpeculativeDecoder(verifier, drafter)
    reqs = requests()[:4]
    assert [sd.generate(r).text for r in reqs] == [c.text for c in sd.generate_batch(reqs)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_drafter_identical_to_the_verifier_accepts_everything(verifier: Expert, temperature: float) -> None:
    sd = SpeculativeDecoder(verifier, verifier, SpeculativeConfig(gamma=5))
    for c in sd.generate_batch(requests(temperature=temperature, seed=3)):
        assert c.trace["drafted"] > 0 and c.trace["acceptance_rate"] == 1.0
        # every round keeps its whole draft plus one token: 1 + ceil(n / 6) verifier passes at most
        assert c.trace["verifier_passes"] <= 2 + c.usage.completion_tokens // 6


def test_trace_reports_drafts_acceptance_and_cost(verifier: Expert, drafter: Expert) -> None:
    sd = SpeculativeDecoder(verifier, drafter, SpeculativeConfig(gamma=3), name="spec")
    c = sd.generate(requests()[0])
    t = c.trace
    assert t["system"] == "spec" and t["type"] == "speculative" and t["verifier"] == "verifier" and t["drafter"] == "drafter"
    assert 0 < t["accepted"] <= t["drafted"] and t["acceptance_rate"] == round(t["accepted"] / t["drafted"], 4)
    # one pass for the prompt, then one per round; every round writes the kept drafts and one token of the verifier
    assert t["verifier_passes"] == 1 + t["rounds"]
    assert t["accepted"] + t["rounds"] >= c.usage.completion_tokens
    assert t["cost"]["verifier_passes"] == t["verifier_passes"]
    assert t["cost"]["verifier_tokens"] >= len(verifier.encode(requests()[0])) + c.usage.completion_tokens - 1
    assert t["cost"]["drafter_passes"] >= t["drafted"]  # a forward pass per drafted token (the first catches up)
    assert t["tokens_per_verifier_pass"] == round(c.usage.completion_tokens / t["verifier_passes"], 4)
    assert t["mean_draft_length"] <= 3


# ------------------------------------------------------------- adaptive
def test_adaptive_draft_length_follows_the_acceptance_rate(verifier: Expert, tiny_expert: Expert) -> None:
    assert best_gamma(0.95, 0.05, 12) > best_gamma(0.5, 0.05, 12) > best_gamma(0.1, 0.05, 12) == 1
    assert best_gamma(1.0, 0.0, 7) == 7 and best_gamma(0.9, 1.05, 7) == 1
    reqs = requests()
    plain = [verifier.generate(r).text for r in reqs]
    # a drafter that always agrees drafts the most it may; one that never does, one token at a time
    same = SpeculativeDecoder(verifier, verifier, SpeculativeConfig(gamma=6, adaptive=True, draft_cost=0.05)).generate_batch(reqs)
    other = _perturbed(verifier, 2.0, "other", seed=5)
    poor = SpeculativeDecoder(verifier, other, SpeculativeConfig(gamma=6, adaptive=True, draft_cost=0.05)).generate_batch(reqs)
    fixed = SpeculativeDecoder(verifier, other, SpeculativeConfig(gamma=6)).generate_batch(reqs)
    assert [c.text for c in same] == plain and [c.text for c in poor] == plain
    assert all(c.trace["mean_draft_length"] > 5 for c in same if c.usage.completion_tokens > 12)
    assert sum(c.trace["drafted"] for c in poor) < sum(c.trace["drafted"] for c in fixed) / 2
    assert sum(c.trace["acceptance_rate"] or 0 for c in poor) < sum(c.trace["acceptance_rate"] or 0 for c in same) / 2


# -------------------------------------------------------------- lookup
def test_lookup_draft_follows_the_earliest_longest_match() -> None:
    seq = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    assert lookup_draft(seq, 3, 2) == [9, 9]  # [1, 2, 3] first occurs at 0
    assert lookup_draft(seq + [4], 3, 3) == [5, 1, 2]  # [2, 3, 4] only at 6
    assert lookup_draft([7, 8, 9], 3, 4) == []
    assert lookup_draft([5, 6, 5], 3, 4) == [6, 5]  # down to a 1-gram
    assert lookup_draft(seq, 3, 0) == []


# ------------------------------------------------------------- sampling
def _exact_first_two(verifier: Expert, prompt: list[int], warp: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The verifier's exact distributions of the first and the second sampled token
    (``warp``: logits to sampling probabilities); index V stands for "the answer had ended"."""
    eos = list(verifier.eos_token_ids)
    with torch.inference_mode():
        p1 = warp(verifier.model(input_ids=torch.tensor([prompt])).logits[0, -1].float())
        vocab = p1.shape[0]
        seqs = torch.tensor([prompt + [x] for x in range(vocab)])
        cond = warp(verifier.model(input_ids=seqs).logits[:, -1].float())  # (V, V): p(y | x)
    ended = torch.zeros(vocab, dtype=torch.bool)
    ended[eos] = True
    live = torch.where(ended, 0.0, p1)
    second = live @ cond
    first = torch.cat([live, p1[ended].sum()[None]])
    return first, torch.cat([torch.where(ended, 0.0, second), (p1[ended].sum() + second[ended].sum())[None]])


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of ``counts`` under ``probs`` (categories expecting < 5 pooled)."""
    from scipy.stats import chisquare

    n = float(counts.sum())
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts.double()[big], counts.double()[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if float(exp[-1]) < 1e-9:  # nothing pooled
        assert float(obs[-1]) == 0.0
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), (exp * (obs.sum() / exp.sum())).numpy()).pvalue)


def _lookup_prompt(verifier: Expert, warp: Any) -> list[int]:
    """X + [a, b] + X: lookup drafts [a, b] here, and a few rounds of setting a, b to
    the verifier's likeliest tokens make the draft plausible (kept sometimes, not always)."""
    x = verifier.encode(GenerationRequest.chat("Reverse the list [1, 2, 3]."))
    a = b = 0
    with torch.inference_mode():
        for _ in range(5):
            seq = x + [a, b] + x
            a = int(warp(verifier.model(input_ids=torch.tensor([seq])).logits[0, -1].float()).argmax())
            b = int(warp(verifier.model(input_ids=torch.tensor([seq + [a]])).logits[0, -1].float()).argmax())
    return x + [a, b] + x


@pytest.mark.parametrize(("kind", "top_p"), [("model", 1.0), ("model", 0.9), (LOOKUP, 1.0)])
def test_sampled_tokens_follow_the_verifiers_distribution(verifier: Expert, kind: str, top_p: float) -> None:
    """Over 1500 seeds, the first and second sampled tokens have the verifier's own
    distributions (temperature 0.15 and top-p as the plain Sampler warps them)."""
    from collab.decode import Sampler

    n, temperature = 1500, 0.15
    warp = Sampler(temperature, top_p).probs
    sampling_drafter = _perturbed(verifier, 0.2, "sampling-drafter", seed=1)
    prompt = verifier.encode(GenerationRequest.chat("Reverse the list [1, 2, 3].")) if kind == "model" else _lookup_prompt(verifier, warp)
    first, second = _exact_first_two(verifier, prompt, warp)
    reqs = [GenerationRequest(prompt="(given as ids)", max_tokens=3, temperature=temperature, top_p=top_p, seed=s) for s in range(n)]
    sd = SpeculativeDecoder(verifier, LOOKUP if kind == LOOKUP else sampling_drafter, SpeculativeConfig(gamma=2))
    assert kind == "model" or lookup_draft(prompt, 3, 2)
    rule = sd.rule(reqs)
    decode.generate_batch(verifier, reqs, rule, prompts=[prompt] * n)
    assert rule.loop is not None
    vocab = first.shape[0] - 1
    counts1, counts2 = torch.zeros(vocab + 1), torch.zeros(vocab + 1)
    for row in rule.loop.rows:
        counts1[row.gen[0] if row.gen else vocab] += 1
        counts2[row.gen[1] if len(row.gen) > 1 else vocab] += 1
    drafted = sum(s.drafted for s in rule.stats)
    accepted = sum(s.accepted for s in rule.stats)
    assert drafted >= n and 0.1 < accepted / drafted < 0.9  # both the keep and the reject branches ran, often
    assert _chi_square_p(counts1, first) > 1e-3
    assert _chi_square_p(counts2, second) > 1e-3
    # the test tells distributions apart: the drafter's own first tokens would fail it
    q1 = Sampler(temperature, top_p).probs(sampling_drafter.model(input_ids=torch.tensor([prompt])).logits[0, -1].float().detach())
    if kind == LOOKUP:
        q1 = torch.zeros_like(q1)
        q1[lookup_draft(prompt, 3, 1)[0]] = 1.0
    q_counts = torch.bincount(torch.multinomial(q1, n, replacement=True, generator=torch.Generator().manual_seed(0)), minlength=vocab + 1)
    assert _chi_square_p(q_counts.float(), first) < 1e-6


def test_seeded_sample_is_reproducible_and_the_same_alone_and_in_a_batch(verifier: Expert, drafter: Expert) -> None:
    sd = SpeculativeDecoder(verifier, drafter, SpeculativeConfig(gamma=3, adaptive=True))
    reqs = [GenerationRequest.chat(p, max_tokens=16, temperature=1.0, seed=s) for s, p in enumerate(CHAT[:4])]
    alone = [sd.generate(r).text for r in reqs]
    assert [sd.generate(r).text for r in reqs] == alone
    assert [c.text for c in sd.generate_batch(reqs)] == alone
    other = [sd.generate(GenerationRequest.chat(p, max_tokens=16, temperature=1.0, seed=s + 100)).text for s, p in enumerate(CHAT[:4])]
    assert other != alone


def test_top_p_is_honoured(verifier: Expert, drafter: Expert) -> None:
    """top_p this small keeps only the most likely token, so hot sampling is greedy."""
    sd = SpeculativeDecoder(verifier, drafter)
    for r in requests()[:3]:
        greedy = verifier.generate(r).text
        for s in range(2):
            narrow = GenerationRequest(messages=r.messages, prompt=r.prompt, max_tokens=MAX_TOKENS, temperature=1.5, top_p=1e-6, seed=s)
            assert sd.generate(narrow).text == greedy


# ------------------------------------------------------------ streaming
@pytest.mark.parametrize("kind", [LOOKUP, "model"])
def test_stream_yields_the_generated_text(verifier: Expert, drafter: Expert, kind: str) -> None:
    sd = SpeculativeDecoder(verifier, LOOKUP if kind == LOOKUP else drafter)
    base = requests()
    texts = [verifier.generate(r).text for r in base]
    variants = [
        *base,
        *(GenerationRequest(messages=r.messages, prompt=r.prompt, max_tokens=MAX_TOKENS, stop=[_stop_for(t)]) for r, t in zip(base[:3], texts)),
        *(GenerationRequest(messages=r.messages, prompt=r.prompt, max_tokens=MAX_TOKENS, temperature=1.0, seed=7) for r in base[:3]),
    ]
    for r in variants:
        gen = sd.generate(r)
        chunks = list(sd.stream(r))
        assert all(ch.finish_reason is None for ch in chunks[:-1])
        streamed = collect_stream(iter(chunks))
        assert streamed.text == gen.text and streamed.finish_reason == gen.finish_reason
        assert streamed.trace["accepted"] == gen.trace["accepted"]


# ------------------------------------------------------ tokenizers, spec
@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with another vocabulary (a smaller BPE)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import make_tokenizer

    path = tmp_path_factory.mktemp("foreign") / "foreign"
    tok = make_tokenizer(vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def test_a_drafter_with_another_tokenizer_is_refused(verifier: Expert, foreign_dir: Path) -> None:
    foreign = Expert.load(foreign_dir, name="foreign")
    with pytest.raises(TokenizerMismatchError, match=r"expert 'verifier' \(\d+ tokens.*expert 'foreign' \(\d+ tokens.*do not share a tokenizer; speculative"):
        SpeculativeDecoder(verifier, foreign)


def test_config_errors_name_the_option(verifier: Expert, drafter: Expert) -> None:
    for kw, key in (({"gamma": 0}, "gamma"), ({"gamma": 2.5}, "gamma"), ({"adaptive": "yes"}, "adaptive"), ({"ngram": 0}, "ngram"), ({"draft_cost": -1}, "draft_cost")):
        with pytest.raises(SpeculativeConfigError) as e:
            SpeculativeConfig(**kw)
        assert e.value.key == key and str(e.value).startswith(f"{key}: expected")
    with pytest.raises(SpeculativeConfigError, match="ngram: applies to the 'lookup' drafter only"):
        SpeculativeDecoder(verifier, drafter, SpeculativeConfig(ngram=2))
    with pytest.raises(Exception, match="drafter: expected an expert or 'lookup'"):
        SpeculativeDecoder(verifier, "ngram")


@pytest.fixture(scope="module")
def spec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spec")


def _spec(root: Path, tiny_model_dir: Path, system: dict[str, Any], extra: dict[str, Any] | None = None, name: str = "spec.yaml") -> Path:
    data = {
        "experts": {"smol": {"ref": str(tiny_model_dir)}, "twin": {"ref": str(tiny_model_dir)}, "far": {"url": "http://127.0.0.1:9/v1", "model": "m"}, **(extra or {})},
        "systems": {"draft": system},
    }
    path = root / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_spec_builds_speculative_systems(spec_root: Path, tiny_model_dir: Path, tiny_expert: Expert) -> None:
    spec = load_spec(_spec(spec_root, tiny_model_dir, {"type": "speculative", "verifier": "smol", "drafter": "lookup", "gamma": 6, "adaptive": True, "ngram": 2}))
    sd = spec.system("draft")
    assert isinstance(sd, SpeculativeDecoder) and sd.name == "draft" and sd.drafter == LOOKUP
    assert sd.gamma == 6 and sd.config.adaptive and sd.config.ngram == 2 and sd.verifier is spec.system("smol")
    req = GenerationRequest.chat("What is 2 + 2?", max_tokens=12)
    c = sd.generate(req)
    assert c.text == tiny_expert.generate(req).text and c.trace["system"] == "draft" and c.trace["drafter"] == "lookup"
    model = load_spec(_spec(spec_root, tiny_model_dir, {"type": "speculative", "verifier": "smol", "drafter": "twin"}, name="model.yaml")).system("draft")
    assert model.drafter.name == "twin" and model.gamma == 4
    assert model.generate(req).trace["acceptance_rate"] == 1.0  # the same weights under another name


@pytest.mark.parametrize(
    ("system", "key", "message"),
    [
        ({"verifier": "smol", "drafter": "lookup", "draft_len": 4}, "systems.draft.draft_len", "unknown key for type 'speculative'"),
        ({"drafter": "lookup"}, "systems.draft.verifier", "missing or not a name"),
        ({"verifier": "smol"}, "systems.draft.drafter", "missing or not a name; expected the name of a local expert or 'lookup'"),
        ({"verifier": "nobody", "drafter": "lookup"}, "systems.draft.verifier", "unknown expert 'nobody'"),
        ({"verifier": "smol", "drafter": "nobody"}, "systems.draft.drafter", "unknown expert 'nobody'"),
        ({"verifier": "far", "drafter": "lookup"}, "systems.draft.verifier", "remote endpoint"),
        ({"verifier": "smol", "drafter": "far"}, "systems.draft.drafter", "remote endpoint"),
        ({"verifier": "smol", "drafter": "twin", "ngram": 2}, "systems.draft.ngram", "applies to 'drafter: lookup' only"),
        ({"verifier": "smol", "drafter": "lookup", "gamma": 0}, "systems.draft.gamma", "expected an integer from 1 to 64"),
        ({"verifier": "smol", "drafter": "lookup", "gamma": "four"}, "systems.draft.gamma", "expected an integer"),
        ({"verifier": "smol", "drafter": "lookup", "adaptive": "on"}, "systems.draft.adaptive", "expected true or false"),
        ({"verifier": "smol", "drafter": "lookup", "ngram": 40}, "systems.draft.ngram", "from 1 to 16"),
        ({"verifier": "smol", "drafter": "lookup", "draft_cost": "cheap"}, "systems.draft.draft_cost", "expected a number"),
    ],
)
def test_spec_errors_name_the_file_and_key(spec_root: Path, tiny_model_dir: Path, system: dict[str, Any], key: str, message: str) -> None:
    path = _spec(spec_root, tiny_model_dir, {"type": "speculative", **system}, name="bad.yaml")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value).startswith(f"{path}: {key}: ")
    assert message in str(e.value)


def test_spec_refuses_an_expert_named_lookup_as_drafter(spec_root: Path, tiny_model_dir: Path) -> None:
    path = _spec(spec_root, tiny_model_dir, {"type": "speculative", "verifier": "smol", "drafter": "lookup"}, {"lookup": {"ref": str(tiny_model_dir)}}, "named.yaml")
    with pytest.raises(SpecError, match=r"systems\.draft\.drafter: 'lookup' names prompt-lookup drafting, and also an expert"):
        load_spec(path)


def test_spec_refuses_a_drafter_with_another_tokenizer_when_built(spec_root: Path, tiny_model_dir: Path, foreign_dir: Path) -> None:
    path = _spec(spec_root, tiny_model_dir, {"type": "speculative", "verifier": "smol", "drafter": "foreign"}, {"foreign": {"ref": str(foreign_dir)}}, "foreign.yaml")
    spec = load_spec(path)
    with pytest.raises(SpecError, match=r"systems\.draft\.drafter: expert 'smol' .* and expert 'foreign' .* do not share a tokenizer"):
        spec.system("draft")


def test_collab_generate_and_eval_run_a_speculative_system(spec_root: Path, tiny_model_dir: Path, tiny_expert: Expert) -> None:
    import json

    from typer.testing import CliRunner

    from collab.cli import app

    path = _spec(spec_root, tiny_model_dir, {"type": "speculative", "verifier": "smol", "drafter": "twin", "gamma": 3}, name="cli.yaml")
    runner = CliRunner()
    r = runner.invoke(app, ["generate", str(path), "What is 2 + 2?", "--system", "draft", "--max-tokens", "12", "--trace"])
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip("\n") == tiny_expert.generate(GenerationRequest.chat("What is 2 + 2?", max_tokens=12)).text
    info = json.loads(r.stderr.strip().splitlines()[-1])
    assert info["trace"]["type"] == "speculative" and info["trace"]["acceptance_rate"] == 1.0
    out = spec_root / "run"
    r = runner.invoke(app, ["eval", str(path), "--system", "draft", "--bench", "skill:arith", "--limit", "3", "--max-tokens", "8", "--out", str(out), "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 3
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["trace"]["type"] == "speculative" for row in rows)


def test_example_spec_validates() -> None:
    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "speculative.yaml")
    kinds = {n: c["type"] for n, c in spec.systems.items()}
    assert set(kinds.values()) == {"speculative"}
    assert {c["drafter"] for c in spec.systems.values()} >= {"lookup"}


# ------------------------------------------------------------- contract
class TestSpeculativeLookupContract(SystemContract):
    @pytest.fixture
    def system(self, tiny_expert: Expert) -> Any:
        return SpeculativeDecoder(tiny_expert, LOOKUP, SpeculativeConfig(adaptive=True), name="spec-lookup")


class TestSpeculativeModelContract(SystemContract):
    @pytest.fixture
    def system(self, tiny_expert: Expert) -> Any:
        return SpeculativeDecoder(tiny_expert, _perturbed(tiny_expert, 0.02, "near"), SpeculativeConfig(gamma=3), name="spec-model")


# ------------------------------------------------------------- real zoo
@pytest.fixture(scope="module")
def smol() -> Expert:
    return Expert.load("zoo:smollm2-135m-instruct", name="smol")


@pytest.mark.slow
@pytest.mark.parametrize("drafter_ref", [LOOKUP, "zoo:smol-arith"])
def test_real_zoo_greedy_identity(smol: Expert, drafter_ref: str) -> None:
    """SmolLM2's own greedy answers, with prompt lookup and with smol-arith (a LoRA
    fine-tune of SmolLM2, so the same tokenizer) drafting; alone and as a batch."""
    drafter = LOOKUP if drafter_ref == LOOKUP else Expert.load(drafter_ref, name="arith")
    sd = SpeculativeDecoder(smol, drafter, SpeculativeConfig(adaptive=drafter_ref == LOOKUP))
    reqs = [
        GenerationRequest.chat("Correct the spelling: 'The quick brwon fox jumpd over the lazzy dog.'", max_tokens=24),
        GenerationRequest.chat("What is 12 + 30?", max_tokens=24),
        GenerationRequest.chat("List three colours, numbered.", max_tokens=24, stop=["3."]),
    ]
    plain = [smol.generate(r) for r in reqs]
    spec = [sd.generate(r) for r in reqs]
    assert [c.text for c in spec] == [c.text for c in plain]
    assert [c.finish_reason for c in spec] == [c.finish_reason for c in plain]
    assert [c.text for c in sd.generate_batch(reqs)] == [c.text for c in plain]
    assert sum(c.trace["accepted"] for c in spec) > 0


# ------------------------------------------------------------------ serve
def test_served_speculative_systems_answer_as_the_verifier(spec_root: Path, tiny_model_dir: Path, tiny_expert: Expert) -> None:
    """`collab serve` of a spec with speculative systems: the official client gets the
    verifier's own answer, streamed or not, with the acceptance figures in the trace."""
    import openai

    from collab.server import CollabServer, ServeOptions, create_app
    from tests.server.helpers import Running

    path = spec_root / "served.yaml"
    path.write_text(yaml.safe_dump({
        "experts": {"smol": {"ref": str(tiny_model_dir)}, "twin": {"ref": str(tiny_model_dir)}},
        "systems": {"look": {"type": "speculative", "verifier": "smol", "drafter": "lookup"},
                    "pair": {"type": "speculative", "verifier": "smol", "drafter": "twin"}},
    }))
    server = CollabServer.from_spec(load_spec(path), ServeOptions(max_wait_ms=20))
    server.load()
    msgs = [{"role": "user", "content": "Repeat after me: one two three, one two three, one two three."}]
    want = tiny_expert.generate(GenerationRequest(messages=msgs, max_tokens=16)).text
    try:
        with Running(create_app(server)) as running:
            client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=60)
            for name in ("look", "pair"):
                r = client.chat.completions.create(model=name, messages=msgs, max_tokens=16)
                assert r.choices[0].message.content == want
                trace = r.model_extra["collab"]
                assert trace["system"] == name and 0.0 <= trace["acceptance_rate"] <= 1.0
                chunks = list(client.chat.completions.create(model=name, messages=msgs, max_tokens=16, stream=True))
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
            assert client.chat.completions.create(model="pair", messages=msgs, max_tokens=16).model_extra["collab"]["acceptance_rate"] == 1.0
    finally:
        server.close()
