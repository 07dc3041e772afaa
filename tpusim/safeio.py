"""Reading the files a user names, and checking where they ask us to write, with every failure one
:class:`TpusimError` that names the path and the reason.

Every input (workload and sweep YAML, HLO text, profiles, run folders) is read through
:func:`read_input`: it refuses what is not a regular file *before* opening it (a FIFO would block
forever, a device could be endless), paths that loop through symbolic links or pass through a file,
names the system finds too long, and files larger than :data:`~tpusim.limits.MAX_INPUT_BYTES`;
gzip is decompressed in bounded pieces, so a small file that expands to gigabytes is refused at the
limit rather than after filling the memory.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from pathlib import Path

from tpusim.errors import TpusimError
from tpusim.limits import MAX_INPUT_BYTES

GZIP_MAGIC = b"\x1f\x8b"

# errno -> the reason in words (the rest fall back to the system's strerror).
_REASONS = {
    errno.ENOENT: "file not found",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ELOOP: "the path loops through symbolic links",
    errno.ENAMETOOLONG: "the file name is too long for the file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a folder, not a file",
}


def os_reason(e: OSError) -> str:
    """Words for an OSError: ours for the common cases, the system's otherwise."""
    return _REASONS.get(e.errno, e.strerror or e.__class__.__name__)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def check_regular(path: str | Path, *, source: str | None = None) -> os.stat_result:
    """``stat`` of ``path`` if it is a regular file (symbolic links followed); else a TpusimError."""
    src = source or str(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise TpusimError(os_reason(e), source=src) from None
    except ValueError:  # a NUL byte in the name
        raise TpusimError("not a valid file name", source=src) from None
    if stat.S_ISDIR(st.st_mode):
        raise TpusimError("is a folder, not a file", source=src)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise TpusimError(f"{kind}: tpusim reads regular files only", source=src)
    return st


def gunzip(raw: bytes, *, source: str, limit: int | None = None) -> bytes:
    """Decompress gzip (one or more members) in bounded pieces; refuse past ``limit`` bytes
    (default :data:`MAX_INPUT_BYTES`)."""
    limit = MAX_INPUT_BYTES if limit is None else limit
    out = bytearray()
    data = raw
    while data:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += d.decompress(data, limit + 1 - len(out))
            while d.unconsumed_tail and len(out) <= limit:
                out += d.decompress(d.unconsumed_tail, limit + 1 - len(out))
        except zlib.error as e:
            raise TpusimError(f"truncated or corrupt gzip ({e})", source=source) from None
        if len(out) > limit:
            raise TpusimError(f"decompresses to more than {_mib(limit)}, tpusim's limit for one input "
                              f"(a gzip bomb, or a file too large to read)", source=source)
        if not d.eof:
            raise TpusimError("truncated or corrupt gzip (the stream ends early)", source=source)
        data = d.unused_data
        if not data.strip(b"\0"):  # gzip allows trailing zero padding
            break
        if data[:2] != GZIP_MAGIC:
            raise TpusimError("truncated or corrupt gzip (trailing garbage)", source=source)
    return bytes(out)


def read_input(path: str | Path, *, source: str | None = None, decompress: bool = True) -> bytes:
    """The bytes of the regular file ``path``, gunzipped when they start with gzip's magic (and
    ``decompress``), at most :data:`MAX_INPUT_BYTES` either way; every failure a TpusimError."""
    src = source or str(path)
    st = check_regular(path, source=src)
    if st.st_size > MAX_INPUT_BYTES:
        raise TpusimError(f"{_mib(st.st_size)}, more than {_mib(MAX_INPUT_BYTES)}, tpusim's limit for one input",
                          source=src)
    try:
        # Non-blocking, and checked again once open: a file swapped for a FIFO after the stat above
        # must not block the read either.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise TpusimError("not a regular file: tpusim reads regular files only", source=src)
            raw = f.read(MAX_INPUT_BYTES + 1)
    except OSError as e:
        raise TpusimError(f"cannot read: {os_reason(e)}", source=src) from None
    if len(raw) > MAX_INPUT_BYTES:
        raise TpusimError(f"more than {_mib(MAX_INPUT_BYTES)}, tpusim's limit for one input", source=src)
    if decompress and raw[:2] == GZIP_MAGIC:
        raw = gunzip(raw, source=src)
    return raw


def read_text(path: str | Path, *, source: str | None = None, what: str = "text") -> str:
    """:func:`read_input` decoded as UTF-8; other bytes are a TpusimError saying it is not ``what``."""
    src = source or str(path)
    raw = read_input(path, source=src)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TpusimError(f"not {what} (not UTF-8 at byte {e.start})", source=src) from None


def check_writable_file(path: str | Path, *, source: str) -> Path:
    """Refuse, before any work, a file path that cannot be written: a folder, a missing parent folder,
    a parent that is a file, or a folder we may not create files in (probed with a temporary file)."""
    path = Path(path)
    if path.is_dir():
        raise TpusimError("is a folder; give a file name", source=source)
    parent = path.parent
    try:
        st = os.stat(parent)
    except OSError as e:
        reason = "its folder does not exist" if e.errno == errno.ENOENT else os_reason(e)
        raise TpusimError(reason, source=source) from None
    if not stat.S_ISDIR(st.st_mode):
        raise TpusimError("a part of the path is a file, not a folder", source=source)
    try:
        import tempfile  # only here: start-up time of every command

        fd, probe = tempfile.mkstemp(dir=parent, prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = "cannot create files in that folder" if e.errno == errno.ENOENT else os_reason(e)
        raise TpusimError(f"cannot write there: {reason}", source=source) from None
    return path
