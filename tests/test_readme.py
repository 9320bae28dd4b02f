"""The documentation's commands are real: every `pomona SUB --flag` in a ```bash block (or an inline `pomona ...`
span) of README.md and docs/*.md names a subcommand and flags that the live parser (`pomona.cli.commands.build_parser`)
accepts, so a renamed or removed flag fails here rather than in a reader's shell. And every page linked from the
README exists."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from pomona.cli.commands import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def command_lines(text: str) -> list[str]:
    """Lines of ```bash blocks (continuations joined), and inline `pomona ...` spans of the prose."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [span for span in re.findall(r"`([^`\n]+)`", prose) if span.startswith("pomona ")]
    return lines


def pomona_commands(line: str) -> list[list[str]]:
    """The words after each `pomona` of a shell line, up to the end of that command (comments dropped)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose: fall back to plain words
        words = line.split("#")[0].split()
    found = []
    for i, word in enumerate(words):
        if word == "pomona":
            rest = words[i + 1:]
            end = next((j for j, w in enumerate(rest) if w in SHELL_OPERATORS or w == "pomona"), len(rest))
            found.append(rest[:end])
    return found


def check_command(words: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """What is wrong with `pomona WORDS` against the parser: an unknown subcommand or flag."""
    where, name = parser, "pomona"
    for word in words:  # descend through subcommands (e.g. `data fetch`) until the first flag or argument
        subs = _subcommands(where)
        if word.startswith("-") or not subs:
            break
        if word not in subs:
            return [f"{name} has no subcommand {word!r} (it has {sorted(subs)})"]
        where, name = subs[word], f"{name} {word}"
    problems = []
    for word in words:
        flag = word.strip("[]").split("=", 1)[0]
        if re.match(r"^--?[A-Za-z]", flag) and flag not in where._option_string_actions:
            problems.append(f"`{name}` has no flag {flag}")
    return problems


def documented_commands() -> list[tuple[str, str, list[str]]]:
    return [(page.relative_to(REPO).as_posix(), line.strip(), words) for page in PAGES
            for line in command_lines(page.read_text(encoding="utf-8")) for words in pomona_commands(line)]


def test_the_docs_have_commands_to_check():
    commands = documented_commands()
    assert len(commands) >= 40, commands  # the extraction works: the README and docs show many commands
    assert {"README.md", "docs/serving.md", "docs/tuning.md"} <= {page for page, _, _ in commands}


@pytest.mark.parametrize("page", [p.relative_to(REPO).as_posix() for p in PAGES])
def test_every_documented_flag_exists_in_its_subcommand(page):
    parser = build_parser()
    problems = [f"{page}: {line}\n    {problem}" for where, line, words in documented_commands() if where == page
                for problem in check_command(words, parser)]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_wrong_flag_and_subcommand():
    parser = build_parser()
    assert check_command(["train", "--data", "x/", "--no-such-flag", "1"], parser) == [
        "`pomona train` has no flag --no-such-flag"]
    assert check_command(["predict", "RUN", "--save-dir", "d/", "--min-confidence", "0.5"], parser) == []
    assert check_command(["data", "fetch", "grocery-apples"], parser) == []
    assert "no subcommand" in check_command(["trian", "--data", "x"], parser)[0]
    assert check_command(["--version"], parser) == []


def test_pages_linked_from_the_readme_exist():
    links = re.findall(r"\]\(([^)#]+\.md)\)", (REPO / "README.md").read_text(encoding="utf-8"))
    assert links and all((REPO / link).is_file() for link in links), links
