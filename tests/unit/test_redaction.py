"""Store URLs carry passwords; nothing towerann prints or logs may show one."""

from __future__ import annotations

import logging

import pytest

from towerann.storeurl import RedactingFilter, parse_store_url, redact


@pytest.mark.parametrize(
    "url, password",
    [
        ("redis://:s3cret-pw@127.0.0.1:6379/0", "s3cret-pw"),
        ("redis://user:p@ss-word@h:1/0", "p@ss-word"),  # '@' in the password: userinfo runs to the last '@'
        ("rediss://default:abc:def-ghi@h:1", "abc:def-ghi"),
        ("redis://:pa%2Fss-1234@h/0", "pa/ss-1234"),  # URL-encoded: both spellings are blanked
        ("unix://:sock-pw-99@/tmp/r.sock?db=1", "sock-pw-99"),
        ("redis://h:1/0?password=qwerty-77&db=2", "qwerty-77"),
    ],
)
def test_redact_blanks_passwords_in_urls_and_anywhere_after(url: str, password: str) -> None:
    parse_store_url(url)  # remembers the password
    assert password not in redact(url) and "***" in redact(url)
    # a client library's message that quotes the password outside any URL
    assert password not in redact(f"AUTH failed for {password!r} (and {password})")


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "Error 111 connecting to 127.0.0.1:6379. Connection refused."
    assert redact(text) == text
    assert redact("embedded:///srv/features.sqlite") == "embedded:///srv/features.sqlite"


def test_the_logging_filter_redacts_messages_and_tracebacks() -> None:
    parse_store_url("redis://:filter-pw-5521@h:1/0")
    try:
        raise ValueError("connecting with filter-pw-5521 failed")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "store %s down", ("redis://:filter-pw-5521@h:1/0",), sys.exc_info()
        )
    assert RedactingFilter().filter(record)
    assert "filter-pw-5521" not in record.getMessage() and "filter-pw-5521" not in (record.exc_text or "")
    assert "redis://***@h:1/0" in record.getMessage()


def test_a_feast_store_url_is_a_non_redis_store_with_its_repo_path():
    from towerann.errors import ConfigError
    from towerann.storeurl import parse_store_url

    u = parse_store_url("feast:/srv/feature_repo")
    assert (u.scheme, u.path, u.is_redis) == ("feast", "/srv/feature_repo", False)
    with pytest.raises(ConfigError, match="repository's path"):
        parse_store_url("feast:")
