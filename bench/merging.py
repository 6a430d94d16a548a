"""Benchmark for `collab merge` (see docs/benchmarks.md).

1. Parity: for every mergekit method, `collab merge` vs mergekit's own CLI on
   tiny Llamas (bit-identical tensors, max abs difference), and which engine
   ran it (collab's streaming engine, or mergekit's run_merge).
2. Cost: SmolLM2-135M-Instruct (the zoo's de-quantised base) and the zoo's
   three domain experts (smol-arith, smol-lists, smol-units: LoRA merged into
   the base, written once as fp32 directories under $COLLAB_CACHE/merge-bench),
   merged by `collab merge` and by `mergekit-yaml`, each in its own subprocess,
   side by side in one run: wall time and peak RSS (child ru_maxrss).
   `--repeats N` alternates which tool runs first and reports medians.
   `--baseline PATH` also runs `collab merge` with PATH first on PYTHONPATH
   (e.g. a checkout of an earlier `merging/` package), in the same rotation.
3. Peak RSS per method (`--rss`): every method of the registry (mergekit's 20
   and collab's four) merging the same real inputs with `collab merge`, one
   subprocess each, and with `--rss-mergekit` mergekit-yaml beside it.
4. Quality (`--quality`): merges of the three experts (linear, task
   arithmetic, TIES, DARE, Fisher, RegMean and a CMA-ES search scored on
   skill:mixed-dev; with `--layer-blocks G` also a search over per-layer-block
   weights) against each expert alone and the base, on the first `--limit`
   test questions of skill:arith, skill:lists and skill:units, with bootstrap
   95% intervals.

    .venv/bin/python bench/merging.py [--skip-parity] [--skip-cost] [--methods ...] [--repeats N] [--baseline PATH]
                                      [--rss [--rss-methods ...] [--rss-mergekit]] [--quality]
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


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``cmd`` run as a child of a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True, env=env)
    rc, dt, rss = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{cmd} failed:\n{out.stderr}")
    return float(dt), int(rss) / 1024


def parity(work: Path) -> list[tuple[str, float, bool, str]]:
    """(method, max abs diff, bit-identical, engine) per mergekit method."""
    import torch

    from merging import merge
    from merging.config import plan_merge
    from merging.inputs import InputResolver
    from merging.layout import unsupported
    from merging.registry import mergekit_methods
    from tests.merging.conftest import load_weights, max_abs_diff, perturb
    from tests.merging.test_parity import SEED, parity_config, run_mergekit_cli
    from tests.tiny import make_tiny_model

    base = make_tiny_model(work / "base", seed=0)
    models = {"base": base, **{f"ft{i}": perturb(base, work / f"ft{i}", seed=100 + i) for i in (1, 2, 3)}}
    rows = []
    for method in sorted(mergekit_methods()):
        cfg = parity_config(method, models)
        p = work / f"{method}.yaml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run_mergekit_cli(p, work / f"mk-{method}", seed=SEED)
        merge(p, work / f"co-{method}", seed=SEED, quiet=True)
        ours, theirs = load_weights(work / f"co-{method}"), load_weights(work / f"mk-{method}")
        same = sorted(ours) == sorted(theirs) and all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
        why = unsupported(plan_merge(p, lambda _p: InputResolver(work, search_dirs=[work])))
        rows.append((method, max_abs_diff(ours, theirs), same, "collab engine" if why is None else f"run_merge ({why})"))
    return rows


EXPERTS = ("smol-arith", "smol-lists", "smol-units")


def real_inputs() -> dict[str, Path]:
    """SmolLM2-135M-Instruct fp32 (the zoo's de-quantised base) and the zoo's three
    domain experts, each LoRA adapter merged into the base and written once as an
    fp32 safetensors directory under ``$COLLAB_CACHE/merge-bench/`` (reused)."""
    from collab.experts import dequantised_dir, resolve_ref
    from collab.io import cache_root
    from merging.inputs import InputResolver

    cache = cache_root() / "merge-bench"
    cache.mkdir(parents=True, exist_ok=True)
    resolver = InputResolver(cache, search_dirs=[Path.cwd()])
    out = {"base": dequantised_dir(resolve_ref("zoo:smollm2-135m-instruct"))}
    for name in EXPERTS:
        out[name] = resolver(f"zoo:{name}", "bench").path
    return out


def cost(work: Path, only: list[str] | None = None, repeats: int = 1, baseline: Path | None = None) -> list[dict[str, object]]:
    """Wall time and peak RSS of mergekit-yaml vs collab merge on the base and the
    three zoo experts, each command in its own subprocess. With ``repeats`` > 1
    the commands rotate which runs first and the medians are reported. With
    ``baseline``, ``collab merge`` also runs with that directory first on
    PYTHONPATH (an earlier ``merging`` package), as a third command."""
    import statistics

    from tests.merging.conftest import load_weights

    work.mkdir(parents=True, exist_ok=True)
    m = real_inputs()
    base = str(m["base"])
    experts = [str(m[e]) for e in EXPERTS]
    configs = {
        "linear": ({"models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts], "merge_method": "linear"}, None),
        "task_arithmetic": (
            {"models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts], "base_model": base, "merge_method": "task_arithmetic"},
            None,
        ),
        "ties": (
            {"models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.5}} for e in experts], "base_model": base, "merge_method": "ties"},
            "ties_fast",
        ),
    }
    rows = []
    for name, (cfg, ours) in configs.items():
        if only and name not in only:
            continue
        cfg = {**cfg, "dtype": "float32"}
        mk_cfg, co_cfg = work / f"{name}-mk.yaml", work / f"{name}-co.yaml"
        mk_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False))
        co_cfg.write_text(yaml.safe_dump({**cfg, "merge_method": ours or cfg["merge_method"]}, sort_keys=False))
        mk_cmd = [str(VENV_BIN / "mergekit-yaml"), str(mk_cfg), str(work / f"{name}-mk"), "--no-write-model-card", "--quiet"]
        co_cmd = [str(VENV_BIN / "collab"), "merge", str(co_cfg), str(work / f"{name}-co"), "--quiet"]
        commands = [("mk", mk_cmd, None), ("co", co_cmd, None)]
        if baseline is not None:
            env = {**os.environ, "PYTHONPATH": f"{baseline}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            commands.append(("bl", [str(VENV_BIN / "collab"), "merge", str(co_cfg), str(work / f"{name}-bl"), "--quiet"], env))
        runs: dict[str, list[tuple[float, float]]] = {tag: [] for tag, _, _ in commands}
        for rep in range(repeats):
            order = commands[rep % len(commands):] + commands[: rep % len(commands)]
            for tag, cmd, env in order:
                subprocess.run(["rm", "-rf", str(work / f"{name}-{tag}")], check=True)
                runs[tag].append(measure(cmd, env))
        t_mk = statistics.median(t for t, _ in runs["mk"])
        t_co = statistics.median(t for t, _ in runs["co"])
        ratios = [c[0] / k[0] for k, c in zip(runs["mk"], runs["co"])]
        a, b = load_weights(work / f"{name}-mk"), load_weights(work / f"{name}-co")
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        differing = sum(int((a[k] != b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
        row: dict[str, object] = {"method": name, "collab_method": ours or name, "repeats": repeats,
               "mergekit_s": t_mk, "collab_s": t_co, "time_ratio": t_co / t_mk, "pair_ratios": ratios,
               "mergekit_s_all": [t for t, _ in runs["mk"]], "collab_s_all": [t for t, _ in runs["co"]],
               "mergekit_rss_mib": max(r for _, r in runs["mk"]), "collab_rss_mib": max(r for _, r in runs["co"]),
               "max_abs_diff": diff, "frac_entries_differing": differing,
               "loadavg": os.getloadavg()}
        if baseline is not None:
            t_bl = statistics.median(t for t, _ in runs["bl"])
            row |= {"baseline_s": t_bl, "baseline_ratio": t_bl / t_mk, "baseline_s_all": [t for t, _ in runs["bl"]],
                    "baseline_rss_mib": max(r for _, r in runs["bl"])}
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def rss_configs(m: dict[str, Path], calib: Path) -> dict[str, dict[str, object]]:
    """One config per registry method on the real inputs: mergekit's parity
    configs (tests/merging/test_parity.py) with the base and the three
    experts, a 32-layer passthrough (layers 0-15 of one expert, 14-29 of
    another), and collab's methods on the three experts."""
    from merging.registry import all_methods
    from tests.merging.test_parity import parity_config

    models = {"base": m["base"], "ft1": m[EXPERTS[0]], "ft2": m[EXPERTS[1]], "ft3": m[EXPERTS[2]]}
    experts = [{"model": str(m[e]), "parameters": {"weight": 1.0}} for e in EXPERTS]
    calib_params = {"calibration": str(calib), "calibration_samples": 32, "max_length": 128}
    out: dict[str, dict[str, object]] = {}
    for name, info in all_methods().items():
        if info.source == "mergekit":
            out[name] = parity_config(name, models)
        elif name == "ties_fast":
            out[name] = {**parity_config("ties", models), "merge_method": "ties_fast"}
        else:
            out[name] = {"models": experts, "merge_method": name, "dtype": "float32",
                         **({"parameters": calib_params} if name in ("fisher", "regmean") else {})}
    out["passthrough"] = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(m[EXPERTS[0]]), "layer_range": [0, 16]}]},
        {"sources": [{"model": str(m[EXPERTS[1]]), "layer_range": [14, 30]}]},
    ]}
    return out


def rss(work: Path, only: list[str] | None = None, with_mergekit: bool = False) -> list[dict[str, object]]:
    """Peak RSS and wall time of `collab merge` (and with ``with_mergekit``
    `mergekit-yaml`) for every method on the real inputs, one subprocess each,
    one at a time."""
    work.mkdir(parents=True, exist_ok=True)
    m = real_inputs()
    calib = _calibration_file(work / "calibration.jsonl", m["base"], 64)
    rows = []
    for name, cfg in rss_configs(m, calib).items():
        if only and name not in only:
            continue
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        subprocess.run(["rm", "-rf", str(work / f"{name}-co"), str(work / f"{name}-mk")], check=True)
        t, peak = measure([str(VENV_BIN / "collab"), "merge", str(path), str(work / f"{name}-co"), "--quiet", "--seed", "0"])
        row: dict[str, object] = {"method": name, "collab_s": t, "collab_rss_mib": peak, "loadavg": os.getloadavg()}
        if with_mergekit and name in _mergekit_names():
            t, peak = measure([str(VENV_BIN / "mergekit-yaml"), str(path), str(work / f"{name}-mk"), "--no-write-model-card",
                               "--quiet", "--random-seed", "0"])
            row |= {"mergekit_s": t, "mergekit_rss_mib": peak}
        rows.append(row)
        print(json.dumps(row), flush=True)
        subprocess.run(["rm", "-rf", str(work / f"{name}-co"), str(work / f"{name}-mk")], check=True)
    return rows


def _mergekit_names() -> set[str]:
    from merging.registry import mergekit_methods

    return set(mergekit_methods())


SKILLS = ("skill:arith", "skill:lists", "skill:units")


def _calibration_file(path: Path, base: Path, n: int) -> Path:
    """Chat-formatted question + answer texts of the first ``n`` examples of
    ``skill:mixed-dev`` (the dev split: never the test questions)."""
    from transformers import AutoTokenizer

    from evals.benchmarks import get_benchmark

    tok = AutoTokenizer.from_pretrained(str(base))
    bench = get_benchmark("skill:mixed-dev")
    with path.open("w") as f:
        for ex in bench.examples(n):
            msgs = bench.messages(ex) + [{"role": "assistant", "content": ex.gold}]
            f.write(json.dumps({"text": tok.apply_chat_template(msgs, tokenize=False)}) + "\n")
    return path


def quality_configs(
    m: dict[str, Path], calib: Path, search_limit: int, search_budget: int, layer_blocks: int = 0, layer_budget: int = 18
) -> dict[str, dict[str, object]]:
    base = str(m["base"])
    experts = [str(m[e]) for e in EXPERTS]

    def models(**params: object) -> list[dict[str, object]]:
        return [{"model": e, "parameters": dict(params)} for e in experts]

    calib_params = {"calibration": str(calib), "calibration_samples": 32, "max_length": 128}
    configs: dict[str, dict[str, object]] = {
        "linear": {"models": models(weight=1.0), "merge_method": "linear"},
        "task_arithmetic": {"models": models(weight=1.0), "base_model": base, "merge_method": "task_arithmetic"},
        "ties": {"models": models(weight=1.0, density=0.5), "base_model": base, "merge_method": "ties_fast"},
        "dare_ties": {"models": models(weight=1.0, density=0.5), "base_model": base, "merge_method": "dare_ties"},
        "fisher": {"models": models(weight=1.0), "merge_method": "fisher", "parameters": calib_params},
        "regmean": {"models": models(weight=1.0), "merge_method": "regmean", "parameters": calib_params},
        "searched (task_arithmetic, cmaes)": {
            "models": models(weight=1.0), "base_model": base, "merge_method": "task_arithmetic",
            "search": {"method": "cmaes", "benchmark": "skill:mixed-dev", "limit": search_limit, "budget": search_budget, "sigma": 0.4},
        },
    }
    if layer_blocks > 1:
        configs[f"searched-layers (task_arithmetic, cmaes, {layer_blocks} layer blocks)"] = {
            "models": models(weight=1.0), "base_model": base, "merge_method": "task_arithmetic",
            "search": {"method": "cmaes", "layers": layer_blocks, "benchmark": "skill:mixed-dev", "limit": search_limit,
                       "budget": layer_budget, "sigma": 0.4},
        }
    return configs


def quality(work: Path, limit: int, search_limit: int, search_budget: int, layer_blocks: int = 0, layer_budget: int = 18) -> list[dict[str, object]]:
    """Per-skill accuracy (bootstrap 95% intervals) of the base, each zoo expert
    alone and each merge of the three experts, on the first ``limit`` test
    questions of each skill benchmark."""
    from collab.experts import Expert
    from evals import evaluate
    from merging import merge

    work.mkdir(parents=True, exist_ok=True)
    m = real_inputs()
    calib = _calibration_file(work / "calibration.jsonl", m["base"], 64)
    rows = []

    def score(name: str, path: Path, note: object = None) -> None:
        slug = name.split()[1] if name.startswith("expert") else name.split()[0]
        expert = Expert.load(path, name=slug)
        row: dict[str, object] = {"system": name}
        for bench in SKILLS:
            r = evaluate(expert, bench, limit=limit, progress=False, out_dir=str(work / "runs" / bench.replace(":", "-") / slug))
            row[bench] = {"score": r.score, "ci": [r.ci_low, r.ci_high], "n": r.n}
        row["average"] = sum(row[b]["score"] for b in SKILLS) / len(SKILLS)  # type: ignore[index]
        if note is not None:
            row["notes"] = note
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Each merge is scored as soon as it exists (a run cut short keeps what it scored).
    for name, cfg in quality_configs(m, calib, search_limit, search_budget, layer_blocks, layer_budget).items():
        out = work / ("merge-" + name.split()[0])
        note = None
        if not (out / "config.json").exists():
            t = time.perf_counter()
            res = merge({**cfg, "dtype": "float32"}, out, seed=0, quiet=True, overwrite=True)
            note = {"merge_seconds": round(time.perf_counter() - t, 1), "search_table": res.search_table}
        score(name, out, note)
    for e in EXPERTS:
        score(f"expert {e}", m[e])
    score("base (SmolLM2-135M-Instruct)", m["base"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--methods", default="", help="comma-separated subset of linear,task_arithmetic,ties for the cost part")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool for the cost part (alternating order; medians)")
    ap.add_argument("--baseline", type=Path, default=None, help="also run collab merge with this directory first on PYTHONPATH")
    ap.add_argument("--rss", action="store_true", help="peak RSS of collab merge for every method on the real inputs")
    ap.add_argument("--rss-methods", default="", help="comma-separated subset of methods for --rss")
    ap.add_argument("--rss-mergekit", action="store_true", help="with --rss, also mergekit-yaml for mergekit's methods")
    ap.add_argument("--quality", action="store_true", help="run the quality part (merges of the zoo experts, skill benchmarks)")
    ap.add_argument("--limit", type=int, default=50, help="test questions per skill for --quality")
    ap.add_argument("--search-limit", type=int, default=30, help="skill:mixed-dev questions per search point")
    ap.add_argument("--search-budget", type=int, default=14, help="CMA-ES evaluations of the searched merge")
    ap.add_argument("--layer-blocks", type=int, default=0, help="also a CMA-ES search over per-layer-block weights (this many blocks)")
    ap.add_argument("--layer-budget", type=int, default=18, help="CMA-ES evaluations of the per-layer-block search")
    ap.add_argument("--work", type=Path, default=None, help="keep inputs/outputs here (default: a temp dir)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-merging-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_parity:
        t = time.perf_counter()
        rows = parity(work / "parity")
        print(f"\n## Parity: collab merge vs mergekit-yaml, tiny Llamas ({time.perf_counter() - t:.0f} s)\n")
        print("| method | max abs diff | bit-identical | engine |\n|---|---|---|---|")
        for method, d, same, engine in rows:
            print(f"| {method} | {d:.2e} | {'yes' if same else 'NO'} | {engine} |")
    if not args.skip_cost:
        rows = cost(work / "cost", [m for m in args.methods.split(",") if m], args.repeats, args.baseline)
        print(f"\n## Cost: SmolLM2-135M base + the zoo's three experts, fp32 (median of {args.repeats}; load {os.getloadavg()[0]:.1f})\n")
        print("| method (collab's) | mergekit-yaml s | collab merge s | time ratio | mergekit peak RSS MiB | collab peak RSS MiB | max abs diff | entries differing |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} ({r['collab_method']}) | {r['mergekit_s']:.1f} | {r['collab_s']:.1f} | {r['time_ratio']:.2f} | "
                  f"{r['mergekit_rss_mib']:.0f} | {r['collab_rss_mib']:.0f} | {r['max_abs_diff']:.2e} | {r['frac_entries_differing']:.2e} |")
        if args.baseline is not None:
            print("\n| method | baseline collab s | baseline time ratio | baseline peak RSS MiB |\n|---|---|---|---|")
            for r in rows:
                print(f"| {r['method']} | {r['baseline_s']:.1f} | {r['baseline_ratio']:.2f} | {r['baseline_rss_mib']:.0f} |")
    if args.rss:
        rows = rss(work / "rss", [m for m in args.rss_methods.split(",") if m], args.rss_mergekit)
        print(f"\n## Peak RSS per method: base + three experts, fp32 (load {os.getloadavg()[0]:.1f})\n")
        print("| method | collab merge s | collab peak RSS MiB | mergekit-yaml s | mergekit-yaml peak RSS MiB |\n|---|---|---|---|---|")
        for r in rows:
            mk = f"{r['mergekit_s']:.1f} | {r['mergekit_rss_mib']:.0f}" if "mergekit_s" in r else "| "
            print(f"| {r['method']} | {r['collab_s']:.1f} | {r['collab_rss_mib']:.0f} | {mk} |")


    if args.quality:
        rows = quality(work / "quality", args.limit, args.search_limit, args.search_budget, args.layer_blocks, args.layer_budget)
        print(f"\n## Quality: first {args.limit} test questions per skill, accuracy [bootstrap 95% interval] (load {os.getloadavg()[0]:.1f})\n")
        print("| system | " + " | ".join(SKILLS) + " | average |\n|---" * 1 + "|---" * (len(SKILLS) + 1) + "|")
        for r in rows:
            cells = " | ".join(f"{r[b]['score']:.2f} [{r[b]['ci'][0]:.2f}, {r[b]['ci'][1]:.2f}]" for b in SKILLS)
            print(f"| {r['system']} | {cells} | {r['average']:.3f} |")


if __name__ == "__main__":
    main()
