"""The access line's text and fields (serving.access) and the log settings that govern it."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from towerann.config import load_config
from towerann.errors import ConfigError
from towerann.server.logs import log_handler
from towerann.serving import access


@pytest.fixture
def out() -> Iterator[dict[str, io.StringIO]]:
    streams = {"text": io.StringIO(), "json": io.StringIO()}
    handlers = [log_handler(fmt, worker="3", stream=s) for fmt, s in streams.items()]
    logger = logging.getLogger(access.ACCESS_LOGGER)
    before = logger.level
    for h in handlers:
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    yield streams
    for h in handlers:
        logger.removeHandler(h)
    logger.setLevel(before)


def test_flags_and_fields_of_a_partial_degraded_answer(out) -> None:
    fields, token = access.start()
    assert access.note() is fields
    fields.update(k=10, degraded=True, partial=True, missing_shards=[1, 3])
    access.finish(token, "POST", "/v1/candidates", 200, 0.00212, fields)
    assert access.note() is None  # the request's note is gone with it
    text = out["text"].getvalue()
    assert text.rstrip("\n").endswith(
        "INFO worker-3 towerann.access: POST /v1/candidates 200 2.12ms k=10 degraded partial missing_shards=1,3"
    )
    got = json.loads(out["json"].getvalue())
    assert {k: got[k] for k in ("method", "route", "status", "ms", "k", "degraded", "partial", "worker")} == {
        "method": "POST",
        "route": "/v1/candidates",
        "status": 200,
        "ms": 2.12,
        "k": 10,
        "degraded": True,
        "partial": True,
        "worker": "3",
    }
    assert got["missing_shards"] == [1, 3] and got["logger"] == "towerann.access"


def test_an_unknown_method_is_not_echoed(out) -> None:
    fields, token = access.start()
    access.finish(token, "X-INJECTED", "other", 405, 0.0001, fields)
    assert "X-INJECTED" not in out["text"].getvalue() and json.loads(out["json"].getvalue())["method"] == "OTHER"


def test_no_note_while_no_request_is_logged() -> None:
    assert access.note() is None


def test_log_format_is_checked_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "towerann.toml"
    path.write_text('[serve]\nlog_format = "json"\naccess_log = false\n')
    cfg = load_config(path)
    assert (cfg.serve.log_format, cfg.serve.access_log) == ("json", False)
    assert load_config(None).serve.log_format == "text" and load_config(None).serve.access_log is True
    path.write_text('[serve]\nlog_format = "xml"\n')
    with pytest.raises(ConfigError, match="log_format must be 'text' or 'json'"):
        load_config(path)
    with pytest.raises(ConfigError, match="log_format"):
        load_config(None).with_overrides(serve_log_format="yaml")
