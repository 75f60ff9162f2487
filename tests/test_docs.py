"""The README and docs/: the generated pages are what tools/make_docs.py writes from the native tables, the
README's two set-up commands are the ones CI runs and the bundled example folds as shown, every relative link
(and anchor) resolves, every page of docs/ is linked from another page, and the README stays short."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted([README, ROOT / "CHANGELOG.md", *DOCS.glob("*.md")])

if not (ROOT / "tools" / "make_docs.py").is_file() or not README.is_file():
    pytest.skip("the checkout's docs are not beside the tests (an installed wheel is being tested)",
                allow_module_level=True)


def _make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "tools" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup_commands() -> list[str]:
    """The sh blocks under the README's "Set-up" heading: the example command, then the test command."""
    section = README.read_text(encoding="utf-8").split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


@pytest.mark.parametrize("page", ["reasons.md", "report-schema.md", "options.md"])
def test_generated_pages_are_up_to_date(page):
    make_docs = _make_docs()
    assert set(make_docs.PAGES) == {"reasons.md", "report-schema.md", "options.md"}
    committed = (DOCS / page).read_text(encoding="utf-8")
    assert committed == make_docs.PAGES[page](), f"docs/{page} is out of date: run python tools/make_docs.py"


def test_the_readme_test_command_is_what_ci_runs():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    test_command = commands[1]
    assert "pytest" in test_command and "\n" not in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f"the README's test command is not a line of .ci/run: {test_command}"


def test_the_readme_example_folds_the_bundled_model_as_shown(tmp_path):
    install, fold = (part.strip() for part in _setup_commands()[0].split("&&"))
    assert install == "pip install ."
    args = shlex.split(fold)
    assert args[0] == "qdqfold"
    for arg in args[1:]:
        if arg.endswith(".onnx") and (ROOT / arg).is_file():  # the input: copied so the output lands in tmp_path
            (tmp_path / arg).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / arg, tmp_path / arg)
    run = subprocess.run([sys.executable, "-m", "qdqfold", *args[1:]], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "100"})
    assert run.returncode == 0, run.stderr
    assert (tmp_path / args[args.index("-o") + 1]).is_file()
    # What the README shows from this run: each BN's outcome (the "+"/"-" lines, however they are wrapped).
    shown = README.read_text(encoding="utf-8").split(f"$ {fold}\n", 1)[1].split("```", 1)[0]
    outcomes = [" ".join(o.split()) for o in re.findall(r"^  [+-] .*?(?=^  [+-] |\Z)", shown, re.M | re.S)]
    assert len(outcomes) >= 2, shown
    printed = " ".join(run.stdout.split())
    for outcome in outcomes:
        assert outcome in printed, f"the README shows an outcome this run does not print: {outcome!r}"


def test_the_readme_is_short():
    size = len(README.read_bytes())
    assert size < 25_000, f"README.md is {size} bytes: move detail into docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # no comments in code blocks
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} names a file that does not exist"
        if anchor:
            assert target.suffix == ".md" and anchor in _anchors(target), f"{page.name}: {link}: no such heading"


def test_every_page_of_docs_is_linked():
    """From the README (its Documentation list), or from another page of docs/: no page is an orphan."""
    linked = {}
    for page in PAGES:
        for link in _links(page):
            if not re.match(r"[a-z]+:", link) and link.partition("#")[0]:
                linked.setdefault((page.parent / link.partition("#")[0]).resolve(), set()).add(page.resolve())
    for page in DOCS.glob("*.md"):
        others = linked.get(page.resolve(), set()) - {page.resolve()}
        assert others, f"docs/{page.name} is linked from no other page: add it to README.md's Documentation list"
