"""What the command line prints around its commands: the width of piped output and shell
completion, in real subprocesses (a terminal's width is read at import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A study file whose `validate` table is wider than 80 columns.
WIDE = REPO / "studies" / "mnist_arch.yaml"


def sweeper(*args: str, columns: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed `sweeper` command (completion scripts are named after it)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    command = Path(sys.executable).parent / "sweeper"
    return subprocess.run([str(command), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def widest_table_line(text: str) -> int:
    """The width of the widest table row (rich draws them with box characters)."""
    return max(len(line.rstrip()) for line in text.splitlines() if line[:1] in "┏┃┡│└")


def test_piped_output_honours_columns() -> None:
    narrow = sweeper("validate", str(WIDE), columns="60")
    default = sweeper("validate", str(WIDE))
    assert narrow.returncode == 0 and default.returncode == 0, narrow.stderr + default.stderr
    assert widest_table_line(narrow.stdout) <= 60 < widest_table_line(default.stdout) <= 140


def test_shell_completion_is_offered() -> None:
    help_text = sweeper("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    script = sweeper("--show-completion", "bash")
    assert script.returncode == 0, script.stderr
    assert "complete" in script.stdout and "_SWEEPER_COMPLETE" in script.stdout
