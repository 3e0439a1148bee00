"""Print one of the README's two quick-start commands, so CI runs exactly what users read.

Usage: python3 .ci/readme_command.py demo|test
The quick start is the first ```bash block after the '## Quick start' heading: line 1 sets up
and runs the demo, line 2 sets up and runs the tests.
"""

import re
import sys
from pathlib import Path


def quick_start_commands(readme: str) -> list:
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```(?:bash|sh)\n(.*?)```", section, re.S)
    if not block:
        raise SystemExit("README: no ```bash block under '## Quick start'")
    lines = [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) != 2:
        raise SystemExit(f"README quick start must be exactly two commands, found {len(lines)}")
    return lines


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    cmds = quick_start_commands(Path(__file__).resolve().parents[1].joinpath("README.md").read_text())
    print({"demo": cmds[0], "test": cmds[1]}[which])
