"""Benchmark for `collab merge` (see docs/benchmarks.md).

1. Parity: for every mergekit method, `collab merge` vs mergekit's own CLI on
   tiny Llamas (max abs difference over all tensors).
2. Cost: three SmolLM2-135M variants in fp32 (the zoo's de-quantised SmolLM2
   plus seeded perturbations, stand-ins for fine-tunes until the zoo's domain
   experts exist): wall time and peak RSS of `collab merge` vs `mergekit-yaml`,
   each in its own subprocess, side by side in one run.

    .venv/bin/python bench/merging.py [--skip-parity] [--skip-cost]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
VENV_BIN = Path(sys.executable).parent

_MEASURE = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
    "dt = time.perf_counter() - t\n"
    "sys.stderr.write(rc.stderr.decode()[-2000:] if rc.returncode else '')\n"
    "print(rc.returncode, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``cmd`` run as a child of a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    rc, dt, rss = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{cmd} failed:\n{out.stderr}")
    return float(dt), int(rss) / 1024


def parity(work: Path) -> list[tuple[str, float]]:
    from merging import merge
    from tests.merging.conftest import load_weights, max_abs_diff, perturb
    from tests.merging.test_parity import SEED, parity_config, run_mergekit_cli
    from tests.tiny import make_tiny_model
    from merging.methods import mergekit_methods

    base = make_tiny_model(work / "base", seed=0)
    models = {"base": base, **{f"ft{i}": perturb(base, work / f"ft{i}", seed=100 + i) for i in (1, 2, 3)}}
    rows = []
    for method in sorted(mergekit_methods()):
        cfg = parity_config(method, models)
        p = work / f"{method}.yaml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run_mergekit_cli(p, work / f"mk-{method}", seed=SEED)
        merge(p, work / f"co-{method}", seed=SEED, quiet=True)
        rows.append((method, max_abs_diff(load_weights(work / f"co-{method}"), load_weights(work / f"mk-{method}"))))
    return rows


def real_inputs(root: Path) -> dict[str, Path]:
    """SmolLM2-135M fp32 (de-quantised zoo model) and two seeded perturbations."""
    from collab.experts import dequantised_dir, resolve_ref
    from tests.merging.conftest import perturb

    src = dequantised_dir(resolve_ref("zoo:smollm2-135m-instruct"))
    out = {"base": src}
    for i in (1, 2):
        d = root / f"smol-ft{i}"
        if not d.exists():
            perturb(src, d, seed=200 + i, scale=0.02)
        out[f"ft{i}"] = d
    return out


def cost(work: Path, only: list[str] | None = None) -> list[dict[str, object]]:
    from tests.merging.conftest import load_weights

    m = real_inputs(work)
    ta_models = [{"model": str(m["base"])}] + [{"model": str(m[f"ft{i}"]), "parameters": {"weight": 0.5, "density": 0.5}} for i in (1, 2)]
    configs = {
        "linear": ({"models": [{"model": str(m[k]), "parameters": {"weight": 1.0}} for k in ("base", "ft1", "ft2")], "merge_method": "linear"}, None),
        "task_arithmetic": ({"models": ta_models, "base_model": str(m["base"]), "merge_method": "task_arithmetic"}, None),
        "ties": ({"models": ta_models, "base_model": str(m["base"]), "merge_method": "ties"}, "ties_fast"),
    }
    rows = []
    for name, (cfg, ours) in configs.items():
        if only and name not in only:
            continue
        cfg = {**cfg, "dtype": "float32"}
        mk_cfg, co_cfg = work / f"{name}-mk.yaml", work / f"{name}-co.yaml"
        mk_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False))
        co_cfg.write_text(yaml.safe_dump({**cfg, "merge_method": ours or cfg["merge_method"]}, sort_keys=False))
        for d in (work / f"{name}-mk", work / f"{name}-co"):
            subprocess.run(["rm", "-rf", str(d)], check=True)
        t_mk, rss_mk = measure([str(VENV_BIN / "mergekit-yaml"), str(mk_cfg), str(work / f"{name}-mk"), "--no-write-model-card", "--quiet"])
        t_co, rss_co = measure([str(VENV_BIN / "collab"), "merge", str(co_cfg), str(work / f"{name}-co"), "--quiet"])
        a, b = load_weights(work / f"{name}-mk"), load_weights(work / f"{name}-co")
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        differing = sum(int((a[k] != b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
        rows.append({"method": name, "collab_method": ours or name, "mergekit_s": t_mk, "collab_s": t_co, "time_ratio": t_co / t_mk,
                     "mergekit_rss_mib": rss_mk, "collab_rss_mib": rss_co, "max_abs_diff": diff, "frac_entries_differing": differing})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--methods", default="", help="comma-separated subset of linear,task_arithmetic,ties for the cost part")
    ap.add_argument("--work", type=Path, default=None, help="keep inputs/outputs here (default: a temp dir)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-merging-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_parity:
        t = time.perf_counter()
        rows = parity(work / "parity")
        print(f"\n## Parity: collab merge vs mergekit-yaml, tiny Llamas ({time.perf_counter() - t:.0f} s)\n")
        print("| method | max abs diff | parity (<= 1e-6) |\n|---|---|---|")
        for method, d in rows:
            print(f"| {method} | {d:.2e} | {'yes' if d <= 1e-6 else 'NO'} |")
    if not args.skip_cost:
        rows = cost(work / "cost", [m for m in args.methods.split(",") if m])
        print("\n## Cost: three SmolLM2-135M fp32 inputs (base + 2 seeded perturbations)\n")
        print("| method (collab's) | mergekit-yaml s | collab merge s | time ratio | mergekit peak RSS MiB | collab peak RSS MiB | max abs diff | entries differing |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} ({r['collab_method']}) | {r['mergekit_s']:.1f} | {r['collab_s']:.1f} | {r['time_ratio']:.2f} | "
                  f"{r['mergekit_rss_mib']:.0f} | {r['collab_rss_mib']:.0f} | {r['max_abs_diff']:.2e} | {r['frac_entries_differing']:.2e} |")


if __name__ == "__main__":
    main()
