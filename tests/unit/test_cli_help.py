"""`towerann --help` all the way down: every subcommand says what it does (a line in its parent's list and
a description on its own page), every option has a help line, a default other than None is shown, choices
are listed, and no help text points at an issue tracker's wording. The parser is built as cli.py builds it.

The exception lists name the gaps in modules whose owners have yet to close them; an entry that is no longer
needed fails the test, so that the lists only shrink."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from towerann.cli import build_parser

# Subcommands without a description of their own (their page shows only the usage and the options).
NO_DESCRIPTION: set[str] = set()
# (subcommand, option) without a help line.
NO_HELP: set[tuple[str, str]] = set()
# (subcommand, option) whose help line does not show its default.
DEFAULT_NOT_SHOWN: set[tuple[str, str]] = set()
# Subcommands whose help speaks of "the issue" (a tracker's wording, meaningless to a user).
SPEAKS_OF_AN_ISSUE: set[str] = set()

# Actions that take no value: their default (False, None, a constant) is not a setting to show.
FLAG_ACTIONS = (
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
    argparse._StoreConstAction,
    argparse._CountAction,
    argparse._HelpAction,
    argparse._VersionAction,
)


def commands() -> Iterator[tuple[str, argparse.ArgumentParser, str | None]]:
    """(the subcommand's words, its parser, its line in the parent's list) for every subcommand, nested ones too."""

    def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser, str | None]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                lines = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    words = f"{path} {name}".strip()
                    yield words, sub, lines.get(name)
                    yield from walk(sub, words)

    yield from walk(build_parser(), "")


def options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction, argparse._VersionAction)):
            continue
        yield (action.option_strings[-1] if action.option_strings else action.dest), action


def shows_default(action: argparse.Action) -> bool:
    """The help line shows the default: %(default)s, or "default" and the value as a user would type it."""
    text = str(action.help)
    if "%(default)" in text:
        return True
    value = action.default
    spellings = {str(value)}
    if isinstance(value, (list, tuple)):
        spellings |= {",".join(map(str, value)), " ".join(map(str, value))}
    if isinstance(value, float):
        spellings |= {f"{value:g}", f"{value:,}"}
    if isinstance(value, int) and not isinstance(value, bool):
        spellings |= {f"{value:,}", f"{value:_}"}
    return "default" in text and any(s in text for s in spellings if s)


def test_the_walk_sees_every_level() -> None:
    found = {words for words, _, _ in commands()}
    assert {"train", "embed", "index build", "index rollback", "features load", "bench shards", "plan"} <= found


@pytest.mark.parametrize("words", ["index build", "index rollback", "index tune", "index info", "features"])
def test_index_and_features_commands_have_a_description_of_their_own(words: str) -> None:
    parser, line = next((p, h) for w, p, h in commands() if w == words)
    assert parser.description and parser.description.strip() != (line or "").strip(), words


def test_every_subcommand_has_a_line_and_a_description() -> None:
    no_line = [words for words, _, line in commands() if not line]
    assert not no_line, f"subcommands without a line in their parent's list: {no_line}"
    missing = {words for words, parser, _ in commands() if not (parser.description or "").strip()}
    assert missing <= NO_DESCRIPTION, f"subcommands without a description: {sorted(missing - NO_DESCRIPTION)}"
    stale = NO_DESCRIPTION - missing
    assert not stale, f"remove from NO_DESCRIPTION, they have one now: {sorted(stale)}"


def test_every_option_has_a_help_line() -> None:
    missing = {(words, flag) for words, parser, _ in commands() for flag, a in options(parser) if not a.help}
    assert missing <= NO_HELP, f"options without help: {sorted(missing - NO_HELP)}"
    stale = NO_HELP - missing
    assert not stale, f"remove from NO_HELP, they have help now: {sorted(stale)}"


def test_every_default_other_than_none_is_shown() -> None:
    hidden = {
        (words, flag)
        for words, parser, _ in commands()
        for flag, a in options(parser)
        if a.help
        and a.help is not argparse.SUPPRESS
        and a.default not in (None, [], ())  # no value: nothing to show
        and not isinstance(a, FLAG_ACTIONS)
        and not shows_default(a)
    }
    assert hidden <= DEFAULT_NOT_SHOWN, f"options whose help hides the default: {sorted(hidden - DEFAULT_NOT_SHOWN)}"
    stale = DEFAULT_NOT_SHOWN - hidden
    assert not stale, f"remove from DEFAULT_NOT_SHOWN, they show it now: {sorted(stale)}"


def test_choices_are_listed_where_a_metavar_hides_them() -> None:
    hidden = [
        (words, flag)
        for words, parser, _ in commands()
        for flag, a in options(parser)
        if a.choices and a.metavar is not None and not all(str(c) in str(a.help) for c in a.choices)
    ]
    assert not hidden, f"options whose choices show nowhere: {hidden}"


def test_refresh_kind_lists_its_choices_in_its_help_line() -> None:
    parser = next(p for w, p, _ in commands() if w == "refresh")
    kind = next(a for flag, a in options(parser) if flag == "--kind")
    assert kind.choices and "auto" in kind.choices
    assert all(str(c) in str(kind.help) for c in kind.choices)


def test_no_help_speaks_of_an_issue() -> None:
    def texts(parser: argparse.ArgumentParser, line: str | None) -> Iterator[str]:
        yield from (str(t) for t in (parser.description, line) if t)
        yield from (str(a.help) for _, a in options(parser) if a.help)

    found = {
        words
        for words, parser, line in commands()
        if any(re.search(r"\bissues?\b", t, re.I) for t in texts(parser, line))
    }
    assert found <= SPEAKS_OF_AN_ISSUE, f"help that speaks of an issue: {sorted(found - SPEAKS_OF_AN_ISSUE)}"
    stale = SPEAKS_OF_AN_ISSUE - found
    assert not stale, f"remove from SPEAKS_OF_AN_ISSUE: {sorted(stale)}"


def test_tuning_k_is_one_default_for_index_build_tune_and_refresh() -> None:
    from towerann.config import ServeConfig

    ks = {
        words: next(a.default for flag, a in options(parser) if flag == "--k")
        for words, parser, _ in commands()
        if words in ("index build", "index tune", "refresh")
    }
    assert ks == dict.fromkeys(("index build", "index tune", "refresh"), ServeConfig().max_k)


def test_every_page_renders() -> None:
    for words, parser, _ in commands():
        assert parser.format_help().startswith(f"usage: towerann {words}"), words
