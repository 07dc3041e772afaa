"""A run folder (``tpusim run --out DIR``), replaced whole or not at all.

Everything is written into a sibling temporary folder ``.DIR.tpusim-tmp.<pid>.<random>``, then
``manifest.json`` (each file and its size) last, then the folder takes DIR's place in one step
(Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, which a crash between them leaves
undone and the next run puts back). A run killed at any point leaves DIR entirely old or entirely new;
its temporary folder is removed by the next run into DIR. :func:`check_run_folder` refuses a folder
without a manifest, or whose files do not match it (``tpusim compare`` calls it).

DIR must be new, empty, or a run folder: it is replaced, so a folder holding anything else is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from tpusim.errors import TpusimError

MANIFEST = "manifest.json"
# What an older tpusim (no manifest) wrote, and what tpusim compare adds to a run folder.
# plugins/ (the XProf runs) is allowed only where the folder's manifest lists files in it: a profile
# logdir also has plugins/, and replacing it whole would delete the profile.
KNOWN_FILES = {"summary.json", "timeline.parquet", "trace.json.gz", "report.html", "compare.trace.json.gz"}
_TMP, _OLD = "tpusim-tmp", "tpusim-old"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` ends, however it ends (SIGKILL included): a process that
    writes into a run's temporary folder for it (``cli/run._alongside``) never outlives the run, and a
    sweep's worker (``explore.workers``) never outlives its sweep. In the foundation so that ``run
    --out``'s writer imports no sweep module (and no pandas with it, issue 13)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1  # <linux/prctl.h>
            if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tpusim-parent-watch").start()


def _siblings(out: Path, kind: str) -> list[tuple[Path, int]]:
    """Temporary (or set-aside) folders of runs into ``out``, with their writers' process ids."""
    found = []
    for p in out.parent.glob(f".{out.name}.{kind}.*"):
        pid = p.name[len(f".{out.name}.{kind}."):].split(".")[0]
        if pid.isdigit():
            found.append((p, int(pid)))
    return found


def _clean_up(out: Path) -> None:
    """Undo what killed runs into ``out`` left: a set-aside old folder goes back if ``out`` is missing."""
    for old, pid in _siblings(out, _OLD):
        if not _alive(pid):
            if not out.exists():
                os.rename(old, out)
            else:
                shutil.rmtree(old, ignore_errors=True)
    for tmp, pid in _siblings(out, _TMP):
        if not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


class RunFolder:
    """``tpusim run|replay|serve --out DIR``: checked and prepared before simulating (an unwritable or
    foreign DIR fails first); :meth:`commit` puts what was written into :attr:`tmp` in DIR's place;
    :meth:`discard` drops it (a failed or interrupted run).

    As a context manager (what the commands use): the block writes into :attr:`tmp`; leaving it
    normally commits, leaving it by an exception discards, and an OSError on the way (writing or
    committing) becomes one TpusimError naming ``--out``."""

    def __init__(self, out_dir: str | Path, command: str = "run"):
        self.out = Path(out_dir).resolve()  # a link: replace the folder it points to, not the link
        self.command = command
        self.src = src = f"--out {out_dir}"
        if self.out == Path.cwd().resolve() or self.out in Path.cwd().resolve().parents:
            raise TpusimError("is the current folder (or holds it), which a run folder replaces whole; choose "
                              "a new or empty folder", source=src)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            _clean_up(self.out)
        except OSError as e:
            raise TpusimError(f"cannot write there: {e.strerror or e}", source=src) from None
        if self.out.exists():
            if not self.out.is_dir():
                raise TpusimError("is a file, not a folder", source=src)
            allowed = KNOWN_FILES | {MANIFEST} | {Path(name).parts[0] for name in _manifest_files(self.out)}
            foreign = sorted(p.name for p in self.out.iterdir() if p.name not in allowed)
            if foreign:
                raise TpusimError(f"holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which "
                                  f"tpusim {command} did not write; the folder is replaced whole, so choose a new or "
                                  "empty one", source=src)
        try:
            self.tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.{_TMP}.{os.getpid()}."))
        except OSError as e:
            raise TpusimError(f"cannot write there: {e.strerror or e}", source=src) from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the usual permissions

    def commit(self) -> None:
        files = {p.relative_to(self.tmp).as_posix(): p.stat().st_size
                 for p in sorted(self.tmp.rglob("*")) if p.is_file()}
        manifest = {"tpusim_run": 1, "files": files}
        with open(self.tmp / MANIFEST, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
        for name in [*files, MANIFEST]:  # on disk before the folder is swapped in
            with open(self.tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if not self.out.exists():
            os.rename(self.tmp, self.out)
        elif not _exchange(self.tmp, self.out):
            old = self.out.with_name(f".{self.out.name}.{_OLD}.{os.getpid()}")
            os.rename(self.out, old)
            os.rename(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
            return
        shutil.rmtree(self.tmp, ignore_errors=True)  # the old folder, after the exchange

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()  # the old folder is replaced whole, or (killed before this) left whole
            elif issubclass(exc_type, OSError):
                raise exc
        except OSError as e:
            raise TpusimError(f"cannot write the {self.command}: {e.strerror or e}", source=self.src) from None
        finally:
            self.discard()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (OSError, AttributeError):  # no renameat2 in this libc
        return False


def _manifest_files(folder: Path) -> dict[str, int]:
    try:
        files = json.loads((folder / MANIFEST).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def check_run_folder(folder: str | Path) -> Path:
    """A complete run folder: its manifest is there and every file it lists has the listed size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TpusimError("not a run folder (no such folder; write one with tpusim run --out)", source=str(folder))
    files = _manifest_files(folder)
    if not files:
        raise TpusimError(f"not a complete run folder ({MANIFEST}, which tpusim run --out writes last, is missing "
                          "or unreadable: the run was interrupted, or an older tpusim wrote it); run tpusim run "
                          "--out again", source=str(folder))
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            raise TpusimError(f"not a complete run folder: {name} is missing or not the size {MANIFEST} says; run "
                              "tpusim run --out again", source=str(folder))
    return folder
