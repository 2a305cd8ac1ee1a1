"""Docs that are generated or quoted must match the code."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    generated = subprocess.run(
        [sys.executable, "-m", "typer", "lorahub_cli.cli.app", "utils", "docs", "--name", "lorahub"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert generated.strip() == (ROOT / "docs" / "cli.md").read_text().strip(), (
        "docs/cli.md is stale: regenerate it with  "
        "typer lorahub_cli.cli.app utils docs --name lorahub --output docs/cli.md"
    )


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_the_readme_says_where_the_demo_leaves_its_files():
    """The demo keeps its registry and composition in the demo home and prints the next commands (issue 23);
    a newcomer reads the README before running it."""
    setup = (ROOT / "README.md").read_text().split("## Set up and run", 1)[1].split("```bash", 1)[0]
    assert "./lorahub-demo-" not in setup and "temporary registry" not in setup, "the demo's old behaviour"
    for words in ("demo home", "compositions/", "export LORAHUB_HOME", "generate --adapter"):
        assert words in setup, f"README's demo paragraph does not mention {words!r}"
