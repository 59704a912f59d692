"""Runs a comparison's steps: one after the other in this process, or as worker processes, each once its inputs
exist, each with its output in its own log file (:mod:`sdzero_pl.pipelines.compare`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from sdzero_pl.pipelines.compare_plan import Step


@contextlib.contextmanager
def redirected(log: Path) -> Iterator[None]:
    """This process's output, Python's and the C libraries', goes to ``log`` (appended) while the block runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a", buffering=1) as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            handle.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


_INTERRUPTED = []  # the signals received while steps run


def interrupted() -> bool:
    """Whether Ctrl-C or SIGTERM arrived while the steps ran: a step's own CLI (Lightning) turns an interrupt into
    ``SystemExit(1)``, which must stop the comparison, not count as one failed step before the next one starts."""
    return bool(_INTERRUPTED)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (and are remembered) while the block runs."""
    def stop(signum, frame) -> None:
        _INTERRUPTED.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    _INTERRUPTED.clear()
    saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_steps(steps: Sequence[Step], *, jobs: int, finished: Callable[[Step], bool],
              needs: Callable[[Step], list[Step]], describe: Callable[[Step], str], log: Callable[[Step], Path],
              run_here: Callable[[Step], bool], start: Callable[[Step], subprocess.Popen]) -> list[str]:
    """Runs the unfinished ``steps``, at most ``jobs`` at a time, each once the steps it ``needs`` are done; returns
    one line per step that failed or could not run. ``jobs`` 1 runs them in this process (``run_here``: no start-up
    cost per step); more start worker processes (``start``). A step's output goes to its ``log`` file."""
    pending = [s for s in steps if not finished(s)]
    done, failed, running = set(steps) - set(pending), {}, {}
    total, count = len(pending), 0
    print(f"{len(steps)} steps, {len(done)} finished before (reused), {total} to run, {jobs} at a time")

    def finish(step: Step, ok: bool, seconds: float | None, why: str = "") -> None:
        nonlocal count
        count += 1
        name, path = describe(step), log(step)
        if seconds is None:
            state = f"not run: {why}"
        else:
            minutes, secs = divmod(round(seconds), 60)
            state = f"{'done' if ok else 'FAILED'} in {minutes}m{secs:02d}s (log {path})"
        print(f"[{count}/{total}] {name}: {state}", flush=True)
        if ok:
            done.add(step)
        else:
            failed[step] = f"{name} failed: see {path}" if seconds is not None else f"{name} {state}"

    with stop_on_signals():
        try:
            _loop(pending, running, done, failed, jobs, needs, log, run_here, start, finish)
        except KeyboardInterrupt:  # stop the workers too; finished steps are kept, the rest redo on the next run
            for process, _ in running.values():
                process.terminate()
            for process, _ in running.values():
                process.wait()
            raise
    return list(failed.values())


def _loop(pending, running, done, failed, jobs, needs, log, run_here, start, finish) -> None:
    while pending or running:
        for step in list(pending):
            broken = [d for d in needs(step) if d in failed]
            if broken:
                pending.remove(step)
                finish(step, False, None, f"{broken[0].method} failed")
            elif len(running) < jobs and all(d in done for d in needs(step)):
                pending.remove(step)
                log(step).parent.mkdir(parents=True, exist_ok=True)
                if jobs == 1:
                    began = time.time()
                    finish(step, run_here(step), time.time() - began)
                else:
                    running[step] = (start(step), time.time())
        for step, (process, began) in list(running.items()):
            if process.poll() is not None:
                del running[step]
                finish(step, process.returncode == 0, time.time() - began)
        if running:
            time.sleep(1.0)
        elif pending and not any(all(d in done or d in failed for d in needs(s)) for s in pending):
            raise AssertionError(f"steps wait on steps that never run: {[str(s) for s in pending]}")
