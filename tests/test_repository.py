"""What a newcomer relies on: the README's two set-up commands are the ones CI runs, and a
test run that collects nothing does not pass."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    demo, test = setup_commands()
    assert demo == "bash scripts/demo.sh" and test == "bash scripts/test.sh"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci
    assert (ROOT / "scripts" / "demo.sh").is_file() and (ROOT / "scripts" / "test.sh").is_file()


def test_test_command_fails_when_no_test_is_collected():
    result = subprocess.run(["bash", "scripts/test.sh", "-k", "no_test_has_this_name", "-p", "no:cacheprovider"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 5
    assert "collected no tests" in result.stderr
