"""Where a sweep's configurations run: in this process, in local worker processes, or as Ray tasks
(see :mod:`tpusim.explore.sweep`).

:func:`iter_rows` takes the tasks as an iterator (a grid of 10^8 configurations is never a list) and
keeps a bounded number in flight. Each row is appended to the journal by the process that computed it,
as it finishes (see :mod:`tpusim.explore.store`). Syncing the journal to disk (``fdatasync``) takes
~5 ms of waiting, as much as a small configuration, so it is not done per row by whoever wrote it: this
process syncs the journal file once for all the rows that have arrived (group commit; ``fdatasync``
flushes the file, whichever process wrote to it) and only then hands them over. So a row reported
finished (progress, ``on_row``, the table) is on disk; a row written and not yet synced survives the
death of any process (it is in the file) and only a power failure can lose it, before it was
reported (resuming then redoes it). Workers never wait for the disk; the serial path syncs (then hands
over) every :data:`GROUP_COMMIT_S`. ``stop()`` turning true ends a sweep gracefully: no new
configuration starts, the running ones finish (and are journaled), then the iterator ends. An exception
(a second Ctrl-C, or the consumer giving up) ends it at once: the worker processes are killed and what
they were computing is redone on resume. Workers ignore SIGINT and SIGTERM (a terminal's Ctrl-C and a
service manager's stop reach the whole process group): the parent decides. Workers also die with
their parent (Linux: ``PR_SET_PDEATHSIG``; elsewhere they poll it), so even SIGKILL leaves no orphans.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable, Iterable, Iterator

from tpusim.errors import TpusimError
from tpusim.explore.store import Journal, plain_row

IN_FLIGHT_PER_WORKER = 2  # tasks submitted ahead per worker: enough to keep each busy, few to cancel
# Configurations per Ray task: one configuration (0.05-0.3 s) is too little work for a remote task's
# scheduling and transfer (milliseconds locally, more across a cluster); 8 amortize it and still let a
# graceful stop finish within a few seconds. Rows of a cancelled batch are redone on resume.
RAY_BATCH = 8
GROUP_COMMIT_S = 0.05  # the serial path: rows are synced and handed over at least this often
_POLL_S = 0.2  # how often a waiting sweep looks at stop()

_journal: Journal | None = None  # this worker process's journal (set by _init_worker)


def _finish(row: dict, journal: Journal | None) -> dict:
    """Journal ``row`` (written, not yet synced: see the module's docstring)."""
    return journal.append(row, sync=False) if journal is not None else plain_row(row)


def _commit(journal: Journal | None) -> None:
    if journal is not None:
        journal.sync()


def _work(task) -> dict:
    """In a worker process: one configuration, journaled (the parent syncs it) before it is returned."""
    from tpusim.explore.sweep import run_task

    return _finish(run_task(task), _journal)


def _init_worker(journal: str | None, parent_pid: int) -> None:
    from tpusim.runfolder import die_with_parent

    global _journal
    # The parent decides when to stop (Ctrl-C, or a service manager's SIGTERM, reaches the whole process
    # group): it lets the running configurations finish, or kills us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent_pid)
    _journal = Journal(journal) if journal is not None else None


def iter_rows(tasks: Iterable, *, workers: int | None = None, ray: str | None = None, journal: Journal | None = None,
              stop: Callable[[], bool] | None = None) -> Iterator[dict]:
    """Rows as configurations finish (any order): serially, in worker processes, or as Ray tasks."""
    tasks = iter(tasks)
    stop = stop or (lambda: False)
    if ray is not None:
        yield from _ray_rows(tasks, ray, journal, stop)
        return
    workers = workers or os.cpu_count() or 1
    head = list(itertools.islice(tasks, workers))
    if workers <= 1 or len(head) <= 1:
        yield from _serial_rows(itertools.chain(head, tasks), journal, stop)
        return
    yield from _pool_rows(itertools.chain(head, tasks), len(head), journal, stop)


def _serial_rows(tasks: Iterator, journal: Journal | None, stop: Callable[[], bool]) -> Iterator[dict]:
    """In this process; rows journaled as they finish and synced (then handed over) every GROUP_COMMIT_S."""
    import time

    from tpusim.explore.sweep import run_task

    group: list[dict] = []
    synced = time.perf_counter()
    try:
        for task in tasks:
            if stop():
                break
            group.append(_finish(run_task(task), journal))
            if time.perf_counter() - synced >= GROUP_COMMIT_S:
                _commit(journal)
                synced = time.perf_counter()
                yield from group
                group = []
    finally:  # the last group (also when stopped or interrupted): synced, then handed over
        if group:
            _commit(journal)
    yield from group


def _pool_rows(tasks: Iterator, workers: int, journal: Journal | None, stop: Callable[[], bool]) -> Iterator[dict]:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # What every configuration runs, imported here once: forked workers inherit it instead of each
    # importing it again (~0.1 s of CPU per worker).
    import tpusim.analysis.summary  # noqa: F401
    import tpusim.api  # noqa: F401
    import tpusim.sim.fastengine  # noqa: F401

    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                               initargs=(str(journal.path) if journal else None, os.getpid()))
    pending: set = set()
    graceful = False
    try:
        while True:
            stopping = stop()
            if not stopping:
                for task in itertools.islice(tasks, workers * IN_FLIGHT_PER_WORKER - len(pending)):
                    pending.add(pool.submit(_work, task))
            else:  # what has not started never will; the running ones finish
                pending = {f for f in pending if not f.cancel()}
            if not pending:
                break
            done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_COMPLETED)
            rows = [future.result() for future in done]
            if rows:
                _commit(journal)  # the workers wrote them; one sync for all, here, while they compute on
            yield from rows
        graceful = True
    finally:
        if not graceful:  # interrupted: what runs now is not finished; end it, it is redone on resume
            for process in list((pool._processes or {}).values()):  # Python 3.14 has kill_workers()
                process.kill()
        pool.shutdown(wait=True, cancel_futures=True)


def run_batch(tasks: list) -> list[dict]:
    """Several configurations in one (Ray) task, in order."""
    from tpusim.explore.sweep import run_task

    return [run_task(task) for task in tasks]


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes (Ray retries a dead address for a long time), if ``HOST:PORT`` is closed."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise TpusimError(f"{address!r} is not auto or HOST:PORT (the head node's, e.g. 10.0.0.2:6379)",
                          source="--ray")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise TpusimError(f"cannot reach a Ray cluster at {address}: {e.strerror or e}", source="--ray") from None


def _ray_rows(tasks: Iterator, address: str, journal: Journal | None, stop: Callable[[], bool]) -> Iterator[dict]:
    """The same :func:`~tpusim.explore.sweep.run_task` as Ray tasks, journaled here as they arrive. ``auto``: the
    running cluster (``RAY_ADDRESS`` or the one last started on this machine), else a new local one;
    otherwise the cluster at ``address``. Workers must have tpusim installed. Tasks go in batches of
    :data:`RAY_BATCH` configurations (:func:`run_batch`)."""
    try:
        import ray
    except ImportError:
        raise TpusimError("Ray is not installed: pip install 'tpusim[ray]'", source="--ray") from None
    started = not ray.is_initialized()
    if started:
        _check_reachable(address)
        try:
            ray.init(address=None if address == "auto" else address, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise TpusimError(f"cannot reach a Ray cluster at {address!r}: {e}", source="--ray") from None
    pending: list = []
    try:
        remote = ray.remote(run_batch)
        window = IN_FLIGHT_PER_WORKER * max(int(ray.cluster_resources().get("CPU", 1)), 1)
        while True:
            if not stop():
                while len(pending) < window and (batch := list(itertools.islice(tasks, RAY_BATCH))):
                    pending.append(remote.remote(batch))
            if not pending:
                break
            done, pending = ray.wait(pending, num_returns=1, timeout=_POLL_S)
            if done:
                more, pending = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
                rows = [_finish(row, journal) for batch in ray.get(done + more) for row in batch]
                _commit(journal)
                yield from rows
    finally:
        for ref in pending:  # interrupted: unfinished tasks are redone on resume
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()

