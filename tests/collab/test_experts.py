from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from collab.errors import ContextLengthError, ModelLoadError, RequestError
from collab.experts import PLAIN_ASSISTANT, Expert, render_plain_prompt, resolve_ref
from collab.system import GenerationRequest


def test_plain_prompt_format_is_documented_shape() -> None:
    text = render_plain_prompt(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "2+2?"},
        ]
    )
    assert text == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: 2+2?\nAssistant:"
    assert text.endswith(PLAIN_ASSISTANT)


def test_trace_names_prompt_format(tiny_expert: Any, tiny_plain_model_dir: Path) -> None:
    assert tiny_expert.generate(GenerationRequest.chat("hi", max_tokens=2)).trace["prompt_format"] == "chat_template"
    assert tiny_expert.generate(GenerationRequest(prompt="hi", max_tokens=2)).trace["prompt_format"] == "raw"
    plain = Expert.load(tiny_plain_model_dir)
    assert plain.prompt_format == "plain"
    assert plain.render(GenerationRequest.chat("hi")) == "User: hi\nAssistant:"


def test_chat_template_is_used(tiny_expert: Any) -> None:
    assert tiny_expert.render(GenerationRequest.chat("hi")) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_loglikelihood_matches_manual_sum(tiny_expert: Any) -> None:
    import torch

    ctx, cont = "The capital of France is", " Paris"
    ll = tiny_expert.loglikelihood(ctx, cont)
    tok = tiny_expert.tokenizer
    ctx_ids = tok(ctx).input_ids
    whole = tok(ctx + cont).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(tiny_expert.model(torch.tensor([whole])).logits[0], -1)
    manual = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx_ids), len(whole)))
    assert ll == pytest.approx(manual, abs=1e-4)
    assert ll < 0


def test_loglikelihood_batch_equals_single(tiny_expert: Any) -> None:
    pairs = [("What is 2 + 2?", " It is 4."), ("Hello", " there"), ("The capital of Italy is", " Rome.")]
    batch = tiny_expert.loglikelihood_batch(pairs, batch_size=3)
    for (c, x), (ll, greedy) in zip(pairs, batch):
        assert ll == pytest.approx(tiny_expert.loglikelihood(c, x), abs=1e-4)
        assert isinstance(greedy, bool)


def _manual_ll(expert: Any, ctx: str, cont: str) -> float:
    import torch

    tok = expert.tokenizer
    ctx_ids, whole = tok(ctx).input_ids, tok(ctx + cont).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(expert.model(torch.tensor([whole])).logits[0], -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx_ids), len(whole)))


def test_shared_context_rows_equal_separate_forward_passes(tiny_expert: Any) -> None:
    q = "Question: which is a fruit?\nAnswer:"
    pairs = [(q, " apple"), ("Hello", " there"), (q, " a red brick wall"), (q, " stone"), ("Hello", " you"), (q, "")]
    packed = tiny_expert.loglikelihood_batch(pairs, batch_size=2)
    rows = tiny_expert._pack_rows([tiny_expert._split_context(c, x) for c, x in pairs])
    assert sorted(len(r.conts) for r in rows) == [2, 4]  # one row per distinct context
    separate = tiny_expert.loglikelihood_batch(pairs, batch_size=1, share_context=False)
    assert packed[-1] == (0.0, True)  # an empty continuation
    for (c, x), (ll, greedy), (ll_sep, greedy_sep) in zip(pairs[:-1], packed, separate):
        assert ll == pytest.approx(_manual_ll(tiny_expert, c, x), abs=1e-4)
        assert ll_sep == pytest.approx(ll, abs=1e-4) and greedy == greedy_sep


def test_packed_rows_respect_the_context_window(tiny_expert: Any) -> None:
    window = tiny_expert.context_window  # 256 for the tiny model
    ctx = ("one two three " * 8).strip()  # 86 tokens, each continuation 55: three fit in 256
    conts = [" four five six seven" * 3 for _ in range(6)]
    split = [tiny_expert._split_context(ctx, c) for c in conts]
    rows = tiny_expert._pack_rows(split)
    assert [len(r.conts) for r in rows] == [3, 3] and all(r.length <= window for r in rows)
    lls = tiny_expert.loglikelihood_batch([(ctx, c) for c in conts])
    assert lls[0][0] == pytest.approx(_manual_ll(tiny_expert, ctx, conts[0]), abs=1e-3)


def test_pair_longer_than_the_window_keeps_its_last_tokens(tiny_expert: Any) -> None:
    import torch

    ctx, cont = "word " * 400, " end of it"
    ll = tiny_expert.loglikelihood(ctx, cont)
    ctx_ids, cont_ids = tiny_expert._split_context(ctx, cont)
    seq = (ctx_ids + cont_ids)[-tiny_expert.context_window :]
    with torch.no_grad():
        logp = torch.log_softmax(tiny_expert.model(torch.tensor([seq])).logits[0], -1)
    n = len(cont_ids)
    manual = sum(float(logp[len(seq) - n - 1 + j, seq[len(seq) - n + j]]) for j in range(n))
    assert ll == pytest.approx(manual, abs=1e-3)
    with pytest.raises(ContextLengthError, match="does not fit the context window"):
        tiny_expert.loglikelihood("hi", " word" * 400)


def test_loglikelihood_greedy_flag(tiny_expert: Any) -> None:
    import torch

    tok = tiny_expert.tokenizer
    ctx = "Hello there"
    ctx_ids = tok(ctx).input_ids
    with torch.no_grad():
        logits = tiny_expert.model(torch.tensor([ctx_ids])).logits[0, -1]
    ranked = logits.argsort(descending=True).tolist()
    checked = 0
    for rank, tid in enumerate(ranked[:50]):
        cont = tok.decode([tid])
        if tok(ctx + cont).input_ids != ctx_ids + [tid] or cont != cont.lstrip():
            continue  # tokenisation does not round-trip for this token
        assert tiny_expert.loglikelihood_batch([(ctx, cont)])[0][1] is (rank == 0)
        checked += 1
        if checked == 3 or rank > 0 and checked >= 2:
            break
    assert checked >= 1


def test_loglikelihood_rolling_is_finite(tiny_expert: Any) -> None:
    v = tiny_expert.loglikelihood_rolling("What is 2 + 2? It is 4. " * 30)  # longer than the 256-token window
    assert math.isfinite(v) and v < 0


def test_forward_exposes_logits_hidden_states_and_cache(tiny_expert: Any) -> None:
    import torch

    ids = torch.tensor([tiny_expert.tokenizer("Hello there").input_ids])
    out = tiny_expert.forward(ids, output_hidden_states=True)
    cfg = tiny_expert.model.config
    assert out.logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (1, ids.shape[1], cfg.hidden_size)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    step = tiny_expert.forward(nxt, cache=out.cache)
    full = tiny_expert.forward(torch.cat([ids, nxt], dim=1), use_cache=False)
    assert torch.allclose(step.logits[0, -1], full.logits[0, -1], atol=1e-4)


def test_prompt_longer_than_context_is_refused(tiny_expert: Any) -> None:
    with pytest.raises(ContextLengthError, match="context window of 256"):
        tiny_expert.generate(GenerationRequest.chat("word " * 400))


def test_max_tokens_clamped_to_context(tiny_expert: Any) -> None:
    c = tiny_expert.generate(GenerationRequest(prompt="0 1 2 3 " * 40, max_tokens=500))
    assert c.usage.prompt_tokens + c.usage.completion_tokens <= 256


def test_request_validation() -> None:
    with pytest.raises(RequestError, match="exactly one"):
        GenerationRequest()
    with pytest.raises(RequestError, match="max_tokens"):
        GenerationRequest.chat("x", max_tokens=0)
    with pytest.raises(RequestError, match=r"messages\[0\]"):
        GenerationRequest(messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(RequestError, match="top_p"):
        GenerationRequest.chat("x", top_p=0)
    assert GenerationRequest.chat("x", stop="\n").stop == ["\n"]


def test_missing_path_errors() -> None:
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_ref("/nonexistent/model")


def test_corrupt_gguf_errors(tmp_path: Path) -> None:
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        Expert.load(bad)
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        Expert.load(truncated)


def test_wrong_file_type_errors(tmp_path: Path) -> None:
    f = tmp_path / "weights.pt"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="expected a .gguf file"):
        Expert.load(f)


def test_dir_without_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json not found"):
        Expert.load(tmp_path)


def test_pickle_weights_refused_without_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        Expert.load(d)
    e = Expert.load(d, allow_pickle=True)
    ref = Expert.load(tiny_model_dir)
    req = GenerationRequest.chat("hi", max_tokens=5)
    assert e.generate(req).text == ref.generate(req).text


def test_unknown_zoo_name() -> None:
    with pytest.raises(ModelLoadError, match="unknown zoo name"):
        Expert.load("zoo:gpt-9")


def test_encoder_is_not_an_expert() -> None:
    from collab import zoo

    if not zoo.get("minilm-l6").installed:
        pytest.skip("minilm package not installed")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        Expert.load("zoo:minilm-l6")


def test_batch_usage_counts_only_generated_tokens(tiny_expert: Any) -> None:
    from collab.system import GenerationRequest

    reqs = [GenerationRequest.chat("What is 2 + 2?", max_tokens=3), GenerationRequest.chat("Hello there", max_tokens=12)]
    batch = tiny_expert.generate_batch(reqs)
    for b, r in zip(batch, reqs):
        single = tiny_expert.generate(r)
        assert b.text == single.text
        assert b.usage == single.usage


def test_empty_raw_prompt_starts_from_the_start_token(tiny_expert: Any) -> None:
    req = GenerationRequest(prompt="", max_tokens=4)
    assert tiny_expert.encode(req) == [tiny_expert.tokenizer.bos_token_id]
    c = tiny_expert.generate(req)
    assert c.usage.prompt_tokens == 1 and c.usage.completion_tokens > 0
    assert "".join(ch.text for ch in tiny_expert.stream(req)) == c.text


def test_truncated_safetensors_names_the_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ModelLoadError, match=r"broken/model.safetensors: not a readable safetensors file, truncated or corrupt"):
        Expert.load(broken)


def test_directory_without_tokenizer_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    with pytest.raises(ModelLoadError, match=r"bare: no tokenizer found \(expected one of tokenizer.json"):
        Expert.load(bare)


def test_bad_dtype_and_device_name_the_expert(tiny_model_dir: Path) -> None:
    import torch

    with pytest.raises(ModelLoadError, match=r"expert 'x': dtype: expected one of auto, float32, bfloat16, float16, found 'float8'"):
        Expert.load(tiny_model_dir, name="x", dtype="float8")
    with pytest.raises(ModelLoadError, match=r"expert 'x': device: expected 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', found 'gpu0'"):
        Expert.load(tiny_model_dir, name="x", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match=r"expert 'x': device 'cuda': this torch build sees no CUDA device"):
            Expert.load(tiny_model_dir, name="x", device="cuda")


def test_experts_are_scorers_and_other_systems_are_refused_by_name(tiny_expert: Any) -> None:
    from collab.remote import RemoteExpert
    from collab.system import BaseSystem, Scorer, scorer

    assert isinstance(tiny_expert, Scorer) and scorer(tiny_expert, "a test") is tiny_expert
    assert isinstance(RemoteExpert("http://127.0.0.1:9/v1", "m"), Scorer)

    class Talker(BaseSystem):
        name = "talker"

    with pytest.raises(RequestError, match=r"system 'talker' cannot score text \(it has no loglikelihood\), which multiple choice needs"):
        scorer(Talker(), "multiple choice")
