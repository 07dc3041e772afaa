"""What every ``tpusim`` command shares: the click group, the one-line error rule, ``--json`` output, common options.

Every command prints a short summary for people, or one JSON object with ``--json``. A mistake in
what the user gave ends with one line on stderr naming the option or file, and exit status 2.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any

import click

from tpusim.errors import TpusimError
from tpusim.limits import MAX_BYTES

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
INTERNAL_ERROR = "tpusim: internal error"  # the fuzz tests assert this line never appears


class _Group(click.Group):
    """Turns TpusimError into one clear line and exit 2, never a traceback.

    Anything else that escapes a command is a bug in tpusim, not the user's mistake: as a last
    resort it becomes one line asking for a report, exit 1 (the fuzz tests check it never fires).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TpusimError as e:
            click.echo(f"tpusim: error: {_one_line(e.message)}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except click.exceptions.UsageError as e:  # a bad option value or a missing argument: one line too
            where = f" (see tpusim {e.ctx.info_name} --help)" if e.ctx is not None and e.ctx.parent is not None else ""
            click.echo(f"tpusim: error: {_one_line(e.format_message())}{where}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:  # noqa: BLE001 (the backstop, see the docstring)
            if os.environ.get("TPUSIM_DEBUG"):  # developers: the traceback
                raise
            click.echo(f"{INTERNAL_ERROR}: {e.__class__.__name__}: {_one_line(str(e))[:300]} "
                       f"(please report it with the command and its input)", err=True)
            sys.exit(EXIT_INTERNAL_ERROR)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tpusim")
def main() -> None:
    """tpusim: a discrete-event simulator of TPU clusters."""


_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKMGT]i?B|B)?\s*$")


def parse_bytes(text: str, *, source: str = "--bytes") -> float:
    """``34e6``, ``34MB``, ``1.5GiB`` -> bytes; anything else, or <= 0, is a TpusimError."""
    from tpusim.units import to_si

    m = _BYTES_RE.match(str(text))
    if not m:
        raise TpusimError(f"{text!r} is not a number of bytes (e.g. 34e6, 34MB, 1GiB)", source=source)
    unit = m.group(2) or "B"
    unit = unit[0].lower() + unit[1:] if unit.startswith("K") and unit != "KiB" else unit
    value = to_si(float(m.group(1)), unit, source=source)
    if not value > 0:
        raise TpusimError(f"bytes must be a positive number; got {text!r}", source=source)
    if value > MAX_BYTES:
        raise TpusimError(f"{text!r} is more than {MAX_BYTES:.0e} bytes (1 PB), tpusim's limit for one collective",
                          source=source)
    return value


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return json_safe(value.item())
    return value


def dumps(payload: dict, **kwargs) -> str:
    """Strict JSON: ``allow_nan=False`` after :func:`json_safe`, so the output always parses."""
    return json.dumps(json_safe(payload), allow_nan=False, **kwargs)


def _emit(as_json: bool, payload: dict, human: str) -> None:
    click.echo(dumps(payload, indent=2, sort_keys=False) if as_json else human)


_topology_option = click.option("--topology", "-t", "topology", required=True, metavar="[CHIP:]SHAPE",
                                help="e.g. v5e:16x16, v5p:4x4x8, tpu7x:4x4x4; a bare 16x16 is v5e (2D) or v5p (3D)")
_slices_option = click.option("--slices", default=1, show_default=True, type=int,
                              help="identical slices joined by DCN")
_json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON object")
_mode_option = click.option("--mode", type=click.Choice(["calibrated", "datasheet"]), default="calibrated",
                            show_default=True, help="fitted link efficiencies, or the datasheet (the book's formulas)")

def prepare_out(out_dir: str, command: str):
    """Check the output folder now (writable; new, empty or a run folder), so a bad one fails before
    any simulation; the run is written beside it and swapped in whole (:mod:`tpusim.runfolder`)."""
    from tpusim.runfolder import RunFolder

    return RunFolder(out_dir, command)
