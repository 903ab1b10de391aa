"""The JSON of POST /v1/candidates says when a sharded index answered without some shards, and only then."""

from __future__ import annotations

from towerann.serving.app import candidates_body
from towerann.serving.retriever import Candidates


def _answer(missing: tuple[int, ...]) -> Candidates:
    return Candidates([7, 3], [0.9, 0.5], "m1", "v1", {"total": 1.0}, missing_shards=missing)


def test_an_answer_without_some_shards_says_partial_and_names_them() -> None:
    body = candidates_body(_answer((1, 3)))
    assert body["partial"] is True and body["missing_shards"] == [1, 3]
    assert [c["item_id"] for c in body["candidates"]] == [7, 3]


def test_a_whole_answer_carries_no_partial_fields() -> None:
    body = candidates_body(_answer(()))
    assert "partial" not in body and "missing_shards" not in body
