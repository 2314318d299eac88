"""The documentation's cross-references resolve: links, #anchors, and the files and modules it names.

Pages move and modules get renamed; a reader who follows a dead link or looks for a file
that is gone loses trust in every other page. Only the project's own Markdown is read, and
only relative targets are checked: an address outside the repository is not ours to vouch
for.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "daemon" / "tfmerge"
#: Top-level folders whose files the pages name in backticks, as in `daemon/tfmerge/config.py`.
NAMED_FOLDERS = ("bench", "config", "daemon", "docs", "frozen", "scripts", "systemd", "tests")
#: Names in backticks that start like a module but are files tfmerge writes or installs.
FILE_SUFFIXES = (".json", ".lock", ".toml", ".service", ".sysusers", ".tmpfiles", ".pb")

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*([^)\s]+)\s*\)")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
_REPO_PATH = re.compile(rf"^(?:{'|'.join(NAMED_FOLDERS)})/[\w./-]*[\w/]$")
_MODULE = re.compile(r"^(?:import |from )?(tfmerge(?:\.\w+)+)$")


def pages() -> list[Path]:
    """Every Markdown file of the project: not in hidden folders (.venv, bench/.work, .git)."""
    found = [
        path
        for path in REPO.rglob("*.md")
        if not any(part.startswith(".") for part in path.relative_to(REPO).parts)
    ]
    return sorted(found)


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered from 1."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = _INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        found.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(path):
        text = _INLINE_CODE.sub("", line)
        found += [(number, target) for target in _LINK.findall(text)]
        found += [(number, target) for target in _IMAGE.findall(text)]
    return found


def code_spans(path: Path) -> list[tuple[int, str]]:
    return [
        (number, match.group(2).strip())
        for number, line in prose_lines(path)
        for match in _INLINE_CODE.finditer(line)
    ]


def broken_link(page: Path, target: str) -> str | None:
    """Why target, as written on page, leads nowhere; None when it resolves."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        return None
    file_part, _, anchor = target.partition("#")
    destination = (page.parent / file_part).resolve() if file_part else page
    if not destination.exists():
        return f"no such file {file_part}"
    if not destination.is_relative_to(REPO):
        return f"{file_part} is outside the repository"
    if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
        return f"no heading #{anchor} in {destination.relative_to(REPO)}"
    return None


def module_exists(dotted: str) -> bool:
    """A tfmerge module or package, or one name defined at the top of one."""
    parts = dotted.split(".")[1:]
    relative = Path(*parts)
    if (PACKAGE / relative).with_suffix(".py").is_file():
        return True
    if (PACKAGE / relative / "__init__.py").is_file():
        return True
    module = (PACKAGE / Path(*parts[:-1])).with_suffix(".py")
    if len(parts) < 2 or not module.is_file():
        return False
    defined = re.compile(rf"^(?:def|class)\s+{parts[-1]}\b|^{parts[-1]}\s*[:=]", re.MULTILINE)
    return bool(defined.search(module.read_text(encoding="utf-8")))


PAGES = pages()
IDS = [str(p.relative_to(REPO)) for p in PAGES]


def test_the_pages_are_found() -> None:
    names = set(IDS)
    assert {"README.md", "docs/config.md", "docs/events.md", "systemd/README.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_link_resolves(page: Path) -> None:
    problems = [
        f"{page.relative_to(REPO)}:{number}: ({target}) {reason}"
        for number, target in links(page)
        if (reason := broken_link(page, target)) is not None
    ]
    assert problems == []


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_named_file_and_module_exists(page: Path) -> None:
    problems = []
    for number, span in code_spans(page):
        where = f"{page.relative_to(REPO)}:{number}"
        if _REPO_PATH.match(span) and not span.startswith("bench/.work"):
            if not (REPO / span).exists():
                problems.append(f"{where}: no file {span}")
            continue
        module = _MODULE.match(span)
        if module and not span.endswith(FILE_SUFFIXES) and not module_exists(module.group(1)):
            problems.append(f"{where}: no module or name {module.group(1)}")
    assert problems == []


def layout_tree(page: Path) -> set[str]:
    """The files of the module tree drawn on page, as paths relative to the package."""
    text = page.read_text(encoding="utf-8")
    block = re.search(r"^```\ndaemon/tfmerge/\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block is not None, f"no module tree in {page.relative_to(REPO)}"
    files, folders = set(), {0: ""}
    for line in block.group(1).splitlines():
        match = re.match(r"^((?:│   |    )*)(?:├── |└── )(\S+)", line)
        assert match is not None, f"not a tree line: {line!r}"
        depth, name = len(match.group(1)) // 4, match.group(2)
        path = folders[depth] + name
        if name.endswith("/"):
            folders[depth + 1] = path
        else:
            files.add(path)
    return files


def test_the_layout_page_lists_every_module() -> None:
    """docs/architecture.md draws the package as it is: no module missing, none left over."""
    modules = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name not in {"__init__.py", "__main__.py"}
    }
    assert layout_tree(REPO / "docs" / "architecture.md") == modules


def test_the_checks_see_what_is_broken(tmp_path: Path) -> None:
    """The checks above report a dead link, a dead anchor and a renamed module."""
    page = REPO / "README.md"
    assert broken_link(page, "docs/config.md#models") is None
    assert broken_link(page, "docs/config.md#no-such-section") is not None
    assert broken_link(page, "docs/no-such-page.md") is not None
    assert broken_link(page, "#quick-start") is None
    assert module_exists("tfmerge.build.probe.check_session_config")
    assert not module_exists("tfmerge.tfcore")
    sample = tmp_path / "sample.md"
    sample.write_text(
        "# A `[watch]` heading (S)\n\n```\n[not](a-link.md)\n```\n\n[a](x.md) `[b](y.md)`\n"
    )
    assert anchors(sample) == {"a-watch-heading-s"}
    assert links(sample) == [(7, "x.md")]
