"""The one reader of training conversations: both trainers read through it, with
the same errors (file, line, field, expected vs found)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collab.conversations import DataError, read_conversations


def test_both_trainers_read_the_same_conversations(tmp_path: Path) -> None:
    from collab.latent.data import LatentDataError, load_conversations
    from decoding.data import DataError as DecodingDataError
    from decoding.data import load_data

    assert LatentDataError is DataError and DecodingDataError is DataError
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "What is 2 + 2?", "response": "4"}, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    a, b = load_data(str(path)), load_conversations(str(path))
    assert a.items == b.items == a.conversations and a.sha256 == b.sha256 and a.describe() == b.describe()
    assert a.items[1].messages == (("system", "Be brief."), ("user", "Hi")) and a.items[1].response == "Hello."
    assert load_data("skill:mixed", 5).items == load_conversations("skill:mixed", 5).items


def test_raw_rows_are_read_only_where_asked(tmp_path: Path) -> None:
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"context": "Q: 1 + 1?\nA:", "continuation": " 2"}) + "\n")
    _, items = read_conversations(str(path), raw=True)
    assert items[0].raw and items[0].request().prompt == "Q: 1 + 1?\nA:"
    with pytest.raises(DataError, match=r"mc.jsonl:1: prompt: expected a non-empty string \(or give 'messages'\), found None"):
        read_conversations(str(path))
    path.write_text("[1]\n")
    with pytest.raises(DataError, match=r"mc.jsonl:1: expected an object with 'prompt' and 'response', or 'messages'$"):
        read_conversations(str(path))
    with pytest.raises(DataError, match=r"or 'context' and 'continuation'"):
        read_conversations(str(path), raw=True)


def test_limits_and_empty_sources(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(5)))
    assert [c.response for c in read_conversations(str(path), 2)[1]] == ["a0", "a1"]
    path.write_text("\n\n")
    with pytest.raises(DataError, match="d.jsonl: no examples"):
        read_conversations(str(path))
    with pytest.raises(DataError, match="skill:poetry: unknown skill"):
        read_conversations("skill:poetry", 3)
