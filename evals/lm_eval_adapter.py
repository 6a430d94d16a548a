"""lm-evaluation-harness model type ``collab``: any collab System under lm-eval.

    python -m evals.lm_eval_cli --model collab \\
        --model_args spec=examples/experts.yaml,system=smol --include_path lm_tasks --tasks collab_arc_easy
    # or a bare model reference:
    collab-lm-eval --model collab --model_args spec=zoo:smollm2-135m-instruct --tasks ...

lm-eval finds model types only in modules it has imported (it has no plugin
entry point for models), so ``collab-lm-eval`` / ``python -m evals.lm_eval_cli``
import this module and then run lm-eval's own command line unchanged. From
Python, ``lm_eval.simple_evaluate(model=CollabLM(system=...), ...)`` works too.

``loglikelihood`` and ``loglikelihood_rolling`` need a system that can score
text (an Expert); ``generate_until`` works on any System. With
``--apply_chat_template`` the conversation is handed to the system as chat
messages (each expert then applies its own template, and a router sees the
conversation), exactly as collab's own runner sends it.
"""

from __future__ import annotations

import json
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from collab.errors import CollabError
from collab.spec import open_system
from collab.system import GenerationRequest, RendersRequests, RollingScorer, generate_all, scorer

#: Prefix of the string ``apply_chat_template`` returns: the messages as JSON.
CHAT_MARKER = "\x00collab-chat\x00"


def _messages(context: str) -> list[dict[str, str]] | None:
    if context.startswith(CHAT_MARKER):
        return json.loads(context[len(CHAT_MARKER) :])
    return None


@register_model("collab")
class CollabLM(LM):
    """lm-eval's LM interface over a collab System. ``model_args``: ``spec``
    (a spec .yaml or a model ref), ``system`` (a name in the spec), ``batch_size``."""

    def __init__(self, spec: str | None = None, system: Any = None, batch_size: int | str = 8, max_batch_size: Any = None, device: Any = None, **_: Any) -> None:
        super().__init__()
        if spec is None and (system is None or isinstance(system, str)):
            raise CollabError("model_args: give spec=<spec.yaml or model ref> (and system=NAME for a spec)")
        self.system = open_system(str(spec), system, pick="system=NAME in --model_args") if spec is not None else system
        try:
            self.batch_size = max(1, int(batch_size))
        except (TypeError, ValueError):  # lm-eval's "auto"
            self.batch_size = 8

    # ---------------------------------------------------------------- chat
    @property
    def tokenizer_name(self) -> str:
        return f"collab-{self.system.name}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        from collab.experts import Expert

        template = self.system.tokenizer.chat_template if isinstance(self.system, Expert) else None
        return str(template or "collab-plain")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return CHAT_MARKER + json.dumps(list(chat_history))

    def _text(self, context: str) -> str:
        """The raw text a chat-marked context stands for, for scoring."""
        msgs = _messages(context)
        if msgs is None:
            return context
        if not isinstance(self.system, RendersRequests):
            from collab.experts import render_plain_prompt

            return render_plain_prompt(msgs)
        return self.system.render(GenerationRequest(messages=msgs))

    # ------------------------------------------------------------- scoring
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        system = scorer(self.system, "lm-eval's loglikelihood tasks (use generation tasks only)")
        pairs = [(self._text(r.args[0]), r.args[1]) for r in requests]
        out = [(float(ll), bool(g)) for ll, g in system.loglikelihood_batch(pairs, batch_size=self.batch_size)]
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        if not isinstance(self.system, RollingScorer):
            raise CollabError(f"system '{self.system.name}' has no loglikelihood_rolling (perplexity tasks need an Expert)")
        out = []
        for r in requests:
            v = float(self.system.loglikelihood_rolling(r.args[0]))
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, v)
            out.append(v)
        return out

    # ----------------------------------------------------------- generation
    def _request(self, context: str, gen_kwargs: dict[str, Any]) -> GenerationRequest:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_tokens = int(kw.pop("max_gen_toks", kw.pop("max_tokens", 256)))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0) or 0.0) if do_sample else 0.0
        top_p = float(kw.pop("top_p", 1.0) or 1.0)
        msgs = _messages(context)
        common = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stop": list(until), "seed": kw.pop("seed", None)}
        return GenerationRequest(messages=msgs, **common) if msgs is not None else GenerationRequest(prompt=context, **common)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        reqs = [self._request(r.args[0], r.args[1]) for r in requests]
        texts: list[str] = []
        for start in range(0, len(reqs), self.batch_size):
            texts.extend(c.text for c in generate_all(self.system, reqs[start : start + self.batch_size]))
        for r, t in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", r.args, t)
        return texts
