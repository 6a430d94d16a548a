"""Take the router latency benchmark to a GPU machine that has no zoo packages.

Here:   .venv/bin/python bench/devcarry.py pack     (writes .devcarry/: the zoo's MiniLM
        as float16, 45 MB, and the LLMRouter table gzipped; keep .devcarry/ git-ignored)
There:  python3 bench/devcarry.py unpack && PYTHONPATH=$PWD python3 bench/routers.py \\
            --skip-quality --skip-loto --skip-routellm --device cuda --minilm /tmp/minilm --table /tmp/train.json

``unpack`` writes the weights back as float32 (the float16 round trip moves embeddings by
at most 1.7e-4 against the original weights) and the table to /tmp/train.json.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = "model16.safetensors"


def pack(out: Path) -> None:
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(ROOT))
    from collab import zoo
    from routers.table import ROUTING_DATA

    src = zoo.get("minilm-l6").path()
    dst = out / "minilm16"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.md", ".gitattributes", "data_config.json"), dirs_exist_ok=True)
    save_file({k: v.half() for k, v in load_file(str(src / "model.safetensors")).items()}, str(dst / WEIGHTS))
    (out / "train.json.gz").write_bytes(gzip.compress((ROUTING_DATA / "llmrouter" / "train.json").read_bytes()))
    print(f"packed {out} ({sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 2**20:.1f} MiB)")


def unpack(src: Path, minilm: Path, table: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src / "minilm16", minilm, ignore=shutil.ignore_patterns(WEIGHTS), dirs_exist_ok=True)
    save_file({k: v.float() for k, v in load_file(str(src / "minilm16" / WEIGHTS)).items()}, str(minilm / "model.safetensors"))
    table.write_bytes(gzip.decompress((src / "train.json.gz").read_bytes()))
    print(f"unpacked MiniLM to {minilm}, the table to {table}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["pack", "unpack"])
    ap.add_argument("--dir", default=str(ROOT / ".devcarry"))
    a = ap.parse_args()
    if a.action == "pack":
        pack(Path(a.dir))
    else:
        unpack(Path(a.dir), Path("/tmp/minilm"), Path("/tmp/train.json"))


if __name__ == "__main__":
    main()
