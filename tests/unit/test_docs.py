"""The documents stay true: every test and function docs/architecture.md names exists, every invariant has a
row, and nothing cites documents that are not in this repository."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
ARCHITECTURE = (PROJECT / "docs" / "architecture.md").read_text()


def invariant_rows() -> dict[int, str]:
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^\| (\d+) \|.*$", ARCHITECTURE, re.MULTILINE)}


def test_every_invariant_has_a_row_with_code_and_tests():
    rows = invariant_rows()
    assert sorted(rows) == list(range(1, 14))
    for number, row in rows.items():
        enforced, proved = row.split("|")[3:5]
        assert "`" in enforced, f"invariant {number} names no code"
        assert "tests/" in proved, f"invariant {number} names no test"


def test_the_tests_the_architecture_names_exist():
    last_file = None
    for cited in re.findall(r"`(tests/[\w/]+\.py)?(::\w+)?`", ARCHITECTURE):
        path, name = cited
        last_file = path or last_file  # `::other_test` continues the file named before it
        if not name:
            continue
        source = (PROJECT / last_file).read_text()
        assert re.search(rf"^def {name[2:]}\(", source, re.MULTILINE), f"{last_file}{name} does not exist"


def test_the_functions_the_architecture_names_exist():
    for dotted in sorted(set(re.findall(r"`((?:pipeline|models)\.[\w.]*\w)[` ]", ARCHITECTURE))):
        parts = dotted.split(".")
        for split in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                target = importlib.import_module(".".join(parts[:split]))
                break
            except ModuleNotFoundError:
                continue
        for attribute in parts[split:]:
            assert hasattr(target, attribute), f"{dotted} does not exist"
            target = getattr(target, attribute)


def test_nothing_cites_documents_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=PROJECT, capture_output=True, text=True,
                           check=True).stdout.split()
    outside = ("ARCHITECTURE" + ".md", "reference" + "/")  # spelled apart: this file cites nothing either
    citing = [f for f in files if any(name in (PROJECT / f).read_text() for name in outside)]
    assert citing == []


def test_every_code_fence_names_its_language():
    for path in [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]:
        inside = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                if not inside:
                    assert line.strip() != "```", f"{path.name}:{number}: a code fence without a language"
                inside = not inside


def test_the_readme_lists_every_setting_with_its_default():
    from pipeline.settings import OPTIONS

    readme = (PROJECT / "README.md").read_text()
    for option in OPTIONS.values():
        default = f"`{option.default}`" if option.default else "(none)"
        assert f"| `{option.env}` | {default} |" in readme, option.env


def test_the_benchmarks_explain_their_options():
    """`make bench`'s script is documented by its --help (argparse formats help texts: a bare % broke it)."""
    out = subprocess.run([sys.executable, str(PROJECT / "benchmarks" / "run.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--stages" in out.stdout and "1% more are new" in " ".join(out.stdout.split())
