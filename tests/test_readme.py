"""The README's example output is what the command prints today, so that it cannot go stale.

The README shows ``$ tpusim run workloads/fsdp_70b.yaml --topology 16x16`` and its output in a
fenced block; this test runs that command (click's CliRunner, in this process) and compares every
line, except the simulator's own wall-clock time ("in 0.23 s"), which depends on the machine.

When a change to the model moves the numbers, regenerate the block with

    python tests/test_readme.py --write

(the same way ``python tests/test_notebooks.py`` regenerates the charts in docs/) and review the
diff: the README is the first thing a user compares their own run with.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from click.testing import CliRunner

from tpusim.cli import main

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
COMMAND = "tpusim run workloads/fsdp_70b.yaml --topology 16x16"
# The fenced block that starts with the command's prompt line, up to its closing fence.
BLOCK = re.compile(r"^```\n\$ " + re.escape(COMMAND) + r"\n(?P<output>.*?)^```$", re.M | re.S)
# The only machine-dependent figure: how long the simulation took on this machine.
WALL_CLOCK = re.compile(r" in \d+(?:\.\d+)? s$", re.M)


def readme_output(text: str) -> str:
    m = BLOCK.search(text)
    assert m, f"README.md has no fenced block starting with '$ {COMMAND}'"
    return m.group("output")


def run_command() -> str:
    """The command's output, run from the repository root as the README's reader would."""
    import os

    argv = shlex.split(COMMAND)[1:]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        result = CliRunner().invoke(main, argv)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return result.output


def without_wall_clock(text: str) -> str:
    return WALL_CLOCK.sub(" in <wall clock> s", text)


def test_readme_example_output_is_current():
    ours = without_wall_clock(run_command())
    shown = without_wall_clock(readme_output(README.read_text()))
    assert "<wall clock>" in shown, "the README's example lost its 'in N s' wall-clock figure"
    assert shown == ours, ("README.md's example output differs from what the command prints; "
                           "regenerate it with `python tests/test_readme.py --write`")


def test_wall_clock_is_the_only_figure_ignored():
    """The masking is narrow: a changed event count or step time is still a difference."""
    line = "  simulated    5374 ops, 18130 events in 0.23 s\n"
    assert without_wall_clock(line) == "  simulated    5374 ops, 18130 events in <wall clock> s\n"
    assert without_wall_clock(line) != without_wall_clock(line.replace("18130", "25840"))
    assert without_wall_clock("  step time    12.4 s    MFU 72.6%\n") == "  step time    12.4 s    MFU 72.6%\n"


def write() -> None:
    """Rewrite README.md's example block with the command's output as it is now.

    The wall-clock figure already shown is kept: a run on a loaded machine is no speed figure (those
    come from ``python -m tpusim.bench``, in the README's speed table)."""
    text = README.read_text()
    m = BLOCK.search(text)
    assert m, f"README.md has no fenced block starting with '$ {COMMAND}'"
    shown = WALL_CLOCK.search(m.group("output"))
    output = run_command()
    if shown:
        output = WALL_CLOCK.sub(lambda _: shown.group(0), output)
    new = text[:m.start("output")] + output + text[m.end("output"):]
    README.write_text(new)
    print("README.md: example output " + ("rewritten" if new != text else "already current"), file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_readme.py --write   (rewrites README.md's example output)")
    write()
