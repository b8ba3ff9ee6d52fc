"""Read instruction-tuning data: one conversation per row of a JSONL/JSON/CSV/TSV table.

A row is either a ``prompt`` and a ``response`` (one user turn, one assistant turn; an optional
``system`` column adds a system turn first), or ``messages``: a list of ``{"role", "content"}``
turns in the chat format (roles ``system``, ``user``, ``assistant``), with at least one assistant
turn — the turns the model learns to write. Any other columns are kept (a ``natural:<column>``
partition can use them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedpeft.data.loading import read_table
from fedpeft.errors import FedPeftError

ROLES = ("system", "user", "assistant")
Turn = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class ConversationTable:
    """Conversations aligned with the rows of ``frame``.

    ``labels`` is all zeros and ``label_names`` empty: a conversation has no class, and the
    partitioners that need one (``dirichlet``) are refused for this data.
    """

    frame: pd.DataFrame
    conversations: list[tuple[Turn, ...]]

    @property
    def labels(self) -> np.ndarray:
        return np.zeros(len(self.conversations), dtype=np.int64)

    @property
    def label_names(self) -> tuple[str, ...]:
        return ()

    def __len__(self) -> int:
        return len(self.conversations)

    def subset(self, rows: np.ndarray) -> ConversationTable:
        """The rows ``rows`` (positions)."""
        rows = np.asarray(rows, dtype=np.int64)
        return ConversationTable(frame=self.frame.iloc[rows].reset_index(drop=True),
                                 conversations=[self.conversations[i] for i in rows])


def load_conversations(path: str | Path) -> ConversationTable:
    """Read ``path`` as conversations (see the module doc).

    Raises
    ------
    FedPeftError
        Missing file, unreadable format, neither ``messages`` nor ``prompt``/``response`` columns,
        or a row whose turns are malformed (its row number is named).
    """
    frame = read_table(path)
    name = Path(path).name
    if "messages" in frame.columns:
        conversations = [_messages(value, name, i) for i, value in enumerate(frame["messages"])]
    elif {"prompt", "response"} <= set(frame.columns):
        system = frame["system"] if "system" in frame.columns else None
        conversations = []
        for i, (prompt, response) in enumerate(zip(frame["prompt"], frame["response"], strict=True)):
            turns = [("user", _text(prompt)), ("assistant", _text(response))]
            if system is not None and _text(system.iloc[i]):
                turns.insert(0, ("system", _text(system.iloc[i])))
            conversations.append(tuple(turns) if turns[-1][1] and turns[-2][1] else ())
    else:
        columns = ", ".join(map(str, frame.columns))
        raise FedPeftError(f"{name} needs a messages column, or prompt and response columns; columns: {columns}")
    keep = np.array([bool(c) for c in conversations])
    if not keep.any():
        raise FedPeftError(f"{name} has no conversation with a non-empty prompt and response")
    return ConversationTable(frame=frame.loc[keep].reset_index(drop=True),
                             conversations=[c for c in conversations if c])


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def _messages(value: Any, name: str, row: int) -> tuple[Turn, ...]:
    """One row's ``messages``: a list of role/content dicts (a JSON string in CSV files)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise FedPeftError(f"{name} row {row + 1}: messages is not a JSON list of turns") from None
    if not isinstance(value, list | tuple) or not value:
        raise FedPeftError(f"{name} row {row + 1}: messages must be a non-empty list of {{role, content}} turns")
    turns = []
    for turn in value:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise FedPeftError(f"{name} row {row + 1}: every turn needs a role and a content")
        role = str(turn["role"])
        if role not in ROLES:
            raise FedPeftError(f"{name} row {row + 1}: role {role!r} is not one of {', '.join(ROLES)}")
        turns.append((role, _text(turn["content"])))
    if not any(role == "assistant" and content for role, content in turns):
        raise FedPeftError(f"{name} row {row + 1}: no assistant turn to learn from")
    return tuple(turns)
