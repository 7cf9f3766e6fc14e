"""The docs stay consistent with the code (the site itself is built by .ci/run, -W).

Fast checks only: every page is reachable from the index, and every command line
shown in the README and the docs parses with the real parser and operations.
"""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

from dask_sweep import cli

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"


def test_every_page_is_in_a_toctree():
    index = (DOCS / "index.md").read_text()
    entries = set()
    for block in re.findall(r"```\{toctree\}(.*?)```", index, re.S):
        entries |= {ln.strip() for ln in block.splitlines() if ln.strip() and ":" not in ln}
    pages = {p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md")}
    pages |= {p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.ipynb")}
    pages.discard("index")
    assert pages <= entries, f"pages not in docs/index.md's toctree: {sorted(pages - entries)}"
    assert (DOCS / "notebooks" / "quickstart.ipynb").resolve() == (
        ROOT / "notebooks" / "quickstart.ipynb"
    ).resolve()


def _command_lines():
    for name in ("README.md", "docs/cli.md", "docs/getting-started.md", "docs/index.md"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("dask-sweep ") and not line.startswith("dask-sweep run INPUT"):
                if "[" in line.split("#")[0] and "[2,1,1]" not in line:
                    continue  # a usage synopsis, not a command
                yield name, line.split(" #")[0].strip()


COMMANDS = list(_command_lines())


def test_docs_show_commands():
    assert len(COMMANDS) >= 8
    assert any("run" in c for _, c in COMMANDS) and any("info" in c for _, c in COMMANDS)


@pytest.mark.parametrize("where, line", COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_commands_parse(where, line):
    args = shlex.split(line)[1:]
    if args[0] == "demo":
        return
    if args in (["--version"],):
        return
    a = cli.build_parser().parse_args(args)
    if a.command == "run":
        for spec in a.operations:
            cli.parse_operation(spec)
