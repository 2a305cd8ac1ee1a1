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
