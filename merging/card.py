"""The README model card of a merged model: its inputs and parameters.

Written by collab rather than mergekit, whose card generator asks the Hub about
every relative path (and fails offline)."""

from __future__ import annotations

from typing import Any

import yaml

from merging.config import MergePlan
from merging.settings import to_yaml


def model_card(plan: MergePlan, name: str, extra: dict[str, Any] | None = None) -> str:
    """Markdown with YAML front matter listing the method, inputs and config."""
    m = plan.method
    front = {"library_name": "transformers", "tags": ["merge", "collab", m.name]}
    if plan.base_ref:
        front["base_model"] = plan.base_ref
    method = f"[{m.pretty_name or m.name}]({m.reference_url})" if m.reference_url else m.name
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        f"# {name}",
        "",
        f"A merge of {len(plan.model_refs)} models made with `collab merge` ({method}, implemented by {m.source}).",
        "",
        "## Inputs",
        "",
        "| reference | kind | notes |",
        "|---|---|---|",
    ]
    # References as the config wrote them: the directories they resolved to are
    # this machine's (LoRA merges live in a work directory deleted after the merge).
    for ref in plan.model_refs:
        inp = plan.inputs[ref]
        role = " (base)" if ref == plan.base_ref else ""
        lines.append(f"| `{ref}`{role} | {inp.kind} | {'; '.join(inp.notes)} |")
    params = _parameters(plan)
    lines += ["", "## Parameters", ""]
    lines += [f"- `{loc}`: `{value}`" for loc, value in params] or ["- (method defaults)"]
    for title, body in (extra or {}).items():
        lines += ["", f"## {title}", "", str(body).rstrip()]
    lines += ["", "## Configuration", "", "```yaml", plan.source_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _parameters(plan: MergePlan) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [(k, to_yaml(v)) for k, v in plan.parameters.items()]
    for m in plan.models:
        out += [(f"{m.ref}.{k}", to_yaml(v)) for k, v in m.parameters.items()]
    for i, s in enumerate(plan.slices):
        out += [(f"slices[{i}].{k}", to_yaml(v)) for k, v in s.parameters.items()]
        for src in s.sources:
            out += [(f"slices[{i}].{src.ref}.{k}", to_yaml(v)) for k, v in src.parameters.items()]
    for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template"):
        if getattr(plan, key) is not None:
            out.append((key, getattr(plan, key)))
    return out
