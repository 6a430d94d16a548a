"""make demo: real experts from the zoo, and a learned router that combines them.

Loads SmolLM2-135M-Instruct, Gemma-3-270M and the three domain experts that
`collab zoo build` fine-tuned from SmolLM2 (arithmetic, lists, unit conversion),
asks each the same questions, then asks the routed system (`type: route` in
examples/zoo.yaml: a kNN router over MiniLM embeddings that picks among all
five experts, trained on routing data that collab's evaluation
collected on the dev questions), and prints who answered what.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent

if TYPE_CHECKING:
    from rich.console import Console

QUESTIONS = [
    ("arith", "What is 647 + 285?", "932"),
    ("lists", "Sort these numbers from smallest to largest: 42, 7, 93, 15, 60", "7, 15, 42, 60, 93"),
    ("units", "Convert 45 km to m.", "45000"),
    ("arith", "What is 23 * 7?", "161"),
]


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from collab import skills
    from collab.spec import load_spec
    from collab.system import GenerationRequest

    console = Console()
    t0 = time.perf_counter()
    spec = load_spec(HERE / "zoo.yaml")
    requests = [GenerationRequest.chat(q, max_tokens=32) for _, q, _ in QUESTIONS]

    def correct(skill: str, text: str, gold: str) -> bool:
        return skills.check(skill, text, gold) == 1.0

    table = Table(title="Each expert alone, then the routed system", show_lines=True)
    table.add_column("system")
    for skill, q, _ in QUESTIONS:
        table.add_column(q, overflow="fold")
    table.add_column("right")
    totals = {}
    for name in [*spec.experts, "auto"]:
        console.print(f"[dim]asking {name} ...[/]")
        system = spec.system(name)
        outs = system.generate_batch(requests)
        marks = [correct(s, o.text, g) for (s, _, g), o in zip(QUESTIONS, outs)]
        totals[name] = sum(marks)
        cells = []
        for o, ok in zip(outs, marks):
            routed = f"\n[cyan]-> {o.trace['routed_to']}[/]" if "routed_to" in o.trace else ""
            cells.append(f"{'[green]✓[/]' if ok else '[red]✗[/]'} {o.text.strip()[:80]}{routed}")
        table.add_row(name, *cells, f"{totals[name]}/{len(QUESTIONS)}")
    console.print(table)
    best = max((n for n in totals if n != "auto"), key=lambda n: totals[n])
    console.print(
        f"routed system: {totals['auto']}/{len(QUESTIONS)} right; best single expert ({best}): {totals[best]}/{len(QUESTIONS)}; "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    heldout_summary(console)
    console.print("More figures: docs/benchmarks.md. Try: collab route ask --router examples/artefacts/zoo-router \"What is 12 * 7?\"")
    return 0


def heldout_summary(console: "Console") -> None:
    """Route the 150 held-out questions of the shipped routing table (collected by
    collab's evaluation) and compare with each expert answering all of them."""
    import json

    import numpy as np

    from routers.base import Router

    rows = [json.loads(line) for line in (HERE / "routing" / "zoo-mixed.jsonl").read_text().splitlines()]
    router = Router.load(HERE / "artefacts" / "zoo-router")
    pred = router.predict([r["prompt"] for r in rows])
    chosen = [router.experts[i] for i in np.argmax(pred, axis=1)]
    routed = sum(r["scores"][c] for r, c in zip(rows, chosen)) / len(rows)
    singles = {e: sum(r["scores"][e] for r in rows) / len(rows) for e in router.experts}
    parts = ", ".join(f"{e} {100 * v:.1f}%" for e, v in singles.items())
    console.print(f"On the {len(rows)} held-out questions of skill:mixed (examples/routing/zoo-mixed.jsonl): {parts}; routed {100 * routed:.1f}%")


if __name__ == "__main__":
    sys.exit(main())
