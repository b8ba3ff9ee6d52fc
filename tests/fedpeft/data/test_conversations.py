"""Reading instruction data: prompt/response rows, chat messages, and one-line errors for bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedpeft.data import partition_indices
from fedpeft.data.conversations import load_conversations
from fedpeft.errors import FedPeftError


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_response_rows_become_user_and_assistant_turns(tmp_path: Path) -> None:
    table = load_conversations(write(tmp_path / "d.jsonl", [
        {"prompt": " Hi? ", "response": "Hello.", "site": "a"},
        {"prompt": "Sum 2+2", "response": "4", "site": "b", "system": "Be brief."},
        {"prompt": "empty answer", "response": "", "site": "c"},  # teaches nothing: dropped
    ]))
    assert table.conversations == [
        (("user", "Hi?"), ("assistant", "Hello.")),
        (("system", "Be brief."), ("user", "Sum 2+2"), ("assistant", "4")),
    ]
    assert list(table.frame["site"]) == ["a", "b"] and table.label_names == () and len(table) == 2
    assert table.subset(np.array([1])).conversations == [table.conversations[1]]


def test_messages_rows_keep_every_turn(tmp_path: Path) -> None:
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
             {"role": "assistant", "content": "A2"}]
    table = load_conversations(write(tmp_path / "d.jsonl", [{"messages": turns}]))
    assert table.conversations == [tuple((t["role"], t["content"]) for t in turns)]


def test_messages_in_a_csv_are_json_text(tmp_path: Path) -> None:
    import csv

    path = tmp_path / "d.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["messages"])
        writer.writerow([json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])])
    assert load_conversations(path).conversations == [(("user", "q"), ("assistant", "a"))]


@pytest.mark.parametrize(("rows", "message"), [
    ([{"text": "x", "label": "y"}], "needs a messages column, or prompt and response columns; columns: text, label"),
    ([{"messages": [{"role": "user", "content": "q"}]}], "row 1: no assistant turn"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}], "role 'bot' is not one"),
    ([{"messages": [{"role": "user"}]}], "every turn needs a role and a content"),
    ([{"messages": "not json"}], "row 1: messages is not a JSON list"),
    ([{"messages": []}], "non-empty list"),
    ([{"prompt": "q", "response": ""}], "no conversation with a non-empty prompt and response"),
])
def test_bad_data_is_one_line(tmp_path: Path, rows: list[dict], message: str) -> None:
    with pytest.raises(FedPeftError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_conversations(write(tmp_path / "d.jsonl", rows))


def test_conversations_partition_iid_and_by_column(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "site": f"s{i % 3}"} for i in range(30)]
    table = load_conversations(write(tmp_path / "d.jsonl", rows))
    iid = partition_indices(table, "iid", num_clients=3, seed=0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(30))
    natural = partition_indices(table, "natural:site", num_clients=3, seed=0)
    assert [sorted({rows[i]["site"] for i in part}) for part in natural] == [["s0"], ["s1"], ["s2"]]
