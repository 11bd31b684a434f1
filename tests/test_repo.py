from __future__ import annotations

import re

from conftest import REPO_ROOT


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1).splitlines()
    test_command = commands[commands.index("# tests (what CI runs)") + 1]
    assert test_command in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
