"""A process sandbox for model-written programs (the code reward of docs/method.md, "Data and verification").

Every run is a fresh process tree in its own session with resource limits (CPU, address space, file size, processes,
open files, no core dumps), a scrubbed environment, stdin from a file, and stdout read with a cap. Where the OS
allows, more holds (see :class:`Protections` and docs/code_verifier.md):

- namespaces (root, or a user namespace when not root, with our own uid and gid mapped into it): each run gets new
  mount, network, IPC and PID namespaces. No network (only a loopback that is down); the program cannot see or
  signal any process outside its run, and everything it starts dies with it (``launcher -> init -> program``,
  :mod:`sdzero_pl.tasks.code.child`: the PID namespace's init is killed).
- private scratch: a size-capped tmpfs over /tmp, /var/tmp, /dev/shm and /run/lock, which is also the program's
  cwd; files written there vanish with the run and cannot fill the disk or RAM past ``scratch_mb``.
- private /proc: a /proc that lists only the run's own processes.
- hidden paths (with a private /proc): the trainer's home and caches, /root, /run/user, the run directories and
  the paths the user adds are empty and read-only; what the program needs from them (the interpreter's and the
  compiler's prefix) is bound back read-only (:mod:`sdzero_pl.tasks.code.mounts`).
- read-only host (with a private /proc, Linux >= 5.12): every mount is read-only; only the scratch is writable.
- uid switch (root only): the program runs under a uid leased from a pool (flock-ed, so concurrent runs, threads
  and processes never share one). RLIMIT_NPROC then counts only this run's processes (it is not enforced for
  root), files readable only by root or by other users stay closed, and signals to any other process fail (EPERM).

Programs and the interpreter are reached through inherited directory descriptors (``/proc/self/fd/N/...``), so the
sandboxed uid needs no search permission on their directories (a pyenv Python under a 0700 /root still runs). With a
mount namespace those descriptors are re-opened inside it, so that ``..`` from them cannot reach the host's tree.
Standard library only.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import math
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from sdzero_pl.tasks.code import mounts
from sdzero_pl.tasks.code.child import nproc_counts_per_user_namespace, plain_nproc, preexec_fn

logger = logging.getLogger(__name__)

SCRATCH = "/tmp"
_SCRATCH_ALIASES = ("/var/tmp", "/dev/shm", "/run/lock")  # other world-writable places, bound to the scratch
_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Limits:
    """Per-run limits. ``time_limit_s`` is wall-clock; RLIMIT_CPU backs it up one second later."""

    time_limit_s: float = 2.0
    memory_mb: int = 1024  # RLIMIT_AS (address space, so a little stricter than a judge's RSS limit)
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write
    scratch_mb: int = 64  # size of the private tmpfs (cwd, /tmp, /dev/shm), where it holds
    max_output_bytes: int = 8 << 20  # stdout beyond this kills the run
    max_processes: int = 32  # RLIMIT_NPROC (threads count too)
    max_open_files: int = 64  # RLIMIT_NOFILE

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value}")


@dataclass(frozen=True)
class Protections:
    """Which protections hold on this host (found when a :class:`SandboxRuntime` starts)."""

    namespaces: bool  # new mount/net/IPC/PID namespaces per run: no network, no view of other processes
    user_namespace: bool  # the namespaces sit in a new user namespace (not root)
    private_scratch: bool  # size-capped private tmpfs as cwd, /tmp, /var/tmp, /dev/shm, /run/lock
    private_proc: bool  # /proc shows only the run's own processes
    uid_switch: bool  # the program runs under a leased unprivileged uid (root only)
    hidden_paths: bool = False  # home, caches, /root, /run/user, run dirs, `hide_paths`: empty and read-only
    read_only_host: bool = False  # every mount but the scratch is read-only

    def summary(self) -> str:
        held = [name for name, value in self.__dict__.items() if value]
        return "sandbox protections: " + (", ".join(held) if held else "rlimits and process groups only")


@dataclass
class RunResult:
    status: str  # "ok" | "exit" (non-zero status) | "timeout" | "output_limit"
    returncode: int | None
    stdout: bytes
    seconds: float


class SandboxRuntime:
    """Per-process state of the sandbox: the base directory, the uid pool, the interpreter, what is hidden from
    programs and the protections.

    ``hide_paths`` are hidden on top of :func:`mounts.default_hidden_paths`; ``keep_paths`` (directories, e.g. a
    compiler's prefix) stay visible, read-only, even under a hidden path, as the interpreter's prefix does.
    Not picklable (it holds descriptors); each process builds its own with :func:`runtime`.
    """

    def __init__(
        self, uid_base: int = 62000, uid_count: int = 512, python_executable: str | None = None,
        hide_paths: Sequence[str] = (), keep_paths: Sequence[str] = (),
    ) -> None:
        if uid_base < 1:
            raise ValueError(f"`uid_base` must be >= 1, got {uid_base}")
        if uid_count < 1:
            raise ValueError(f"`uid_count` must be >= 1, got {uid_count}")
        self.uid_base, self.uid_count = uid_base, uid_count
        # A fixed host path (not $TMPDIR): the uid locks must be shared by every job and rank on the host.
        self.base_dir = _private_dir(Path("/tmp") / f"sdzero-sandbox-{os.geteuid()}")
        self.lock_dir = _private_dir(self.base_dir / "uid-locks")
        real = os.path.realpath(python_executable or sys.executable)
        self.python_prefix = os.path.dirname(os.path.dirname(real))
        self._python_fd = os.open(self.python_prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._python_rel = os.path.relpath(real, self.python_prefix)
        self.scratch_aliases = tuple(p for p in _SCRATCH_ALIASES if os.path.isdir(p))
        self.hide_paths = tuple(dict.fromkeys(mounts.default_hidden_paths() + mounts.check_hide_paths(hide_paths)))
        keeps = [*mounts.interpreter_prefixes(self.python_prefix), *(os.path.realpath(p) for p in keep_paths)]
        self.keep_paths = tuple(dict.fromkeys(keeps))
        mounts.check_keeps(self.keep_paths, self.hide_paths)
        self.protections = Protections(False, False, False, False, False)
        self.protections = _probe(self)
        if self.protections.hidden_paths:
            logger.info("hidden from sandboxed programs (where they exist): %s", ", ".join(self.hide_paths))

    def python_argv(self) -> list[str]:
        """The interpreter, isolated (``-I``: no user site, no PYTHON* variables, no script dir on sys.path)."""
        return [f"/proc/self/fd/{self._python_fd}/{self._python_rel}", "-I", "-B"]

    def lease_uid(self) -> tuple[int, int]:
        """A free uid of the pool and the descriptor whose flock holds it (close it to give the uid back)."""
        start = random.randrange(self.uid_count)
        for k in range(self.uid_count):
            uid = self.uid_base + (start + k) % self.uid_count
            fd = os.open(self.lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return uid, fd
            except BlockingIOError:
                os.close(fd)
        raise RuntimeError(f"all {self.uid_count} sandbox uids from {self.uid_base} are in use; raise `uid_count`")


@functools.lru_cache(maxsize=None)
def runtime(
    uid_base: int = 62000, uid_count: int = 512, python_executable: str | None = None,
    hide_paths: tuple[str, ...] = (), keep_paths: tuple[str, ...] = (),
) -> SandboxRuntime:
    """The process-wide :class:`SandboxRuntime` for these settings (probed once)."""
    return SandboxRuntime(uid_base, uid_count, python_executable, hide_paths, keep_paths)


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"sandbox directory {path} must be a directory owned by uid {os.geteuid()}, mode 0700")
    return path


class Sandbox:
    """One program's sandbox: a private directory for its files and, as root, a leased uid. A context manager."""

    def __init__(self, rt: SandboxRuntime) -> None:
        self.rt = rt
        self.dir = Path(tempfile.mkdtemp(prefix="run-", dir=rt.base_dir))
        os.chmod(self.dir, 0o711)  # the sandboxed uid may open known names, never list or write
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.uid, self._lease_fd = rt.lease_uid() if rt.protections.uid_switch else (None, None)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        os.close(self._dir_fd)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.uid is not None:  # before the lease is released: the uid's next holder starts with no process
            _sweep_uid(self.uid, () if self.rt.protections.namespaces else self.rt.scratch_aliases + (SCRATCH,))
        if self._lease_fd is not None:
            os.close(self._lease_fd)
            self._lease_fd = None

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> str:
        """Write ``name`` (root-owned, read-only to the program); return the path the program opens it by."""
        path = self.dir / name
        with open(path, "wb") as handle:
            handle.write(data)
        os.chmod(path, mode)
        return self.path(name)

    def path(self, name: str) -> str:
        return f"/proc/self/fd/{self._dir_fd}/{name}"

    def run(
        self, argv: Sequence[str], stdin: bytes, limits: Limits, export: str | None = None, capture_stderr: bool = False
    ) -> RunResult:
        """Run ``argv`` in the sandbox; stderr is discarded unless ``capture_stderr`` (then it joins stdout).

        With ``export``, the run gets a writable directory (its path replaces ``{export_dir}`` in ``argv``) and the
        file ``export`` it leaves there is copied into the sandbox directory as a root-owned executable (the
        compiler's output); :class:`ExportMissing` if there is none."""
        export_dir = export_fd = None
        if export is not None:
            export_dir = Path(tempfile.mkdtemp(prefix="export-", dir=self.rt.base_dir))
            if self.uid is not None:
                os.chown(export_dir, self.uid, self.uid)
            export_fd = os.open(export_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            argv = [a.replace("{export_dir}", f"/proc/self/fd/{export_fd}") for a in argv]
        try:
            result = self._run(argv, stdin, limits, export_fd, export_dir, capture_stderr)
            if export_dir is not None and result.status == "ok":
                self._import_export(export_dir, export, limits)
            return result
        finally:
            if export_fd is not None:
                os.close(export_fd)
                shutil.rmtree(export_dir, ignore_errors=True)

    def _import_export(self, export_dir: Path, name: str, limits: Limits) -> None:
        # The program owned that directory: never follow a link it may have planted, cap what is copied.
        try:
            fd = os.open(export_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise ExportMissing(f"{name} was not produced ({err.strerror})") from None
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ExportMissing(f"{name} is not a regular file")
            data = handle.read(limits.file_size_mb << 20)
        self.add_file(name, data, mode=0o755)

    def _run(
        self, argv: Sequence[str], stdin: bytes, limits: Limits, export_fd: int | None, export_dir: Path | None,
        capture_stderr: bool,
    ) -> RunResult:
        prot = self.rt.protections
        home = SCRATCH if prot.private_scratch or prot.uid_switch else str(self.dir)
        env = {"PATH": _PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home, "TMPDIR": home,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        own_count = prot.uid_switch or (prot.user_namespace and nproc_counts_per_user_namespace())
        nproc = limits.max_processes if own_count else plain_nproc(limits)
        layout = self._layout(limits, export_fd, export_dir) if prot.private_scratch else None
        preexec = preexec_fn(prot, limits, nproc, self.uid, layout, SCRATCH if prot.private_scratch else None)
        with tempfile.TemporaryFile(dir=self.rt.base_dir) as stdin_file:
            stdin_file.write(stdin)
            stdin_file.seek(0)
            start = time.monotonic()
            proc = subprocess.Popen(
                list(argv), stdin=stdin_file, stdout=subprocess.PIPE, cwd=self.dir,
                stderr=subprocess.STDOUT if capture_stderr else subprocess.DEVNULL,
                env=env, pass_fds=[fd for fd in (self.rt._python_fd, self._dir_fd, export_fd) if fd is not None],
                preexec_fn=preexec,
                start_new_session=True,
            )
        try:
            stdout, status = _read_capped(proc, start + limits.time_limit_s, limits.max_output_bytes)
        finally:
            _stop(proc, prot.namespaces)
        if status == "ok" and proc.returncode != 0:
            status = "exit"
        return RunResult(status, proc.returncode, stdout, time.monotonic() - start)

    def _layout(self, limits: Limits, export_fd: int | None, export_dir: Path | None) -> mounts.Layout:
        prot, rt = self.rt.protections, self.rt
        owner = f",uid={self.uid},gid={self.uid}" if self.uid is not None else ""
        opts = f"size={limits.scratch_mb}m,mode=0700{owner}"
        binds = [(self._dir_fd, str(self.dir), False)]
        if export_fd is not None:
            binds.append((export_fd, str(export_dir), True))
        return mounts.plan(SCRATCH, opts, rt.scratch_aliases, prot.read_only_host,
                           rt.hide_paths if prot.hidden_paths else (), rt.keep_paths, binds,
                           [(rt._python_fd, rt.python_prefix)])


class ExportMissing(RuntimeError):
    """The run exited cleanly but did not leave the file it was to export (a compiler that wrote nothing)."""


def _sweep_uid(uid: int, shared_dirs: Sequence[str], timeout_s: float = 30.0) -> None:
    """Kill every process of the leased uid and wait until none is left, then remove what it left in
    ``shared_dirs`` (the world-writable directories, without namespaces).

    A program may have left its process group; with a PID namespace the kernel kills what is left when its init
    dies, but a fork bomb's hundreds of processes take a while to exit on a loaded host, and until they have, they
    count against the uid's RLIMIT_NPROC: the uid's next holder could not even start a correct program."""
    pid = os.fork()
    if pid == 0:  # as that uid, kill(-1) reaches exactly its processes (in child PID namespaces too)
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:  # nothing of the uid is left, zombies included
                    os._exit(0)
                if not _live_processes(uid):  # zombies only: their reaper's business
                    os._exit(0)
                if time.monotonic() > deadline:
                    os._exit(1)
                time.sleep(0.01)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        logger.warning("sandbox uid %d: processes still alive %g s after SIGKILL (%s)", uid, timeout_s,
                       _live_processes(uid)[:10])
    for directory in shared_dirs:
        for entry in os.scandir(directory):
            if entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _live_processes(uid: int) -> list[int]:
    """Host pids of the processes whose real uid is ``uid`` and that are not zombies (the caller left out)."""
    pids, me = [], str(os.getpid())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or entry.name == me:
            continue
        try:
            with open(f"/proc/{entry.name}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle.read().splitlines() if ":" in line)
        except OSError:  # exited meanwhile
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry.name))
    return pids


def _read_capped(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, str]:
    """stdout until EOF and exit, or until the deadline / the output cap is hit.

    The run ends when the (launcher) process exits, even if something it left behind still holds stdout."""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    chunks, size = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), "timeout"
        exited = proc.poll() is not None
        if poller.poll(0 if exited else math.ceil(min(remaining, 0.1) * 1000)):
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                data = None
            if data == b"":
                break
            if data:
                size += len(data)
                if size > cap:
                    return b"".join(chunks), "output_limit"
                chunks.append(data)
                continue
        if exited:
            break
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
    except subprocess.TimeoutExpired:
        return b"".join(chunks), "timeout"
    return b"".join(chunks), "ok"


def _stop(proc: subprocess.Popen, namespaced: bool) -> None:
    """Kill whatever is left of a run and reap it."""
    if namespaced and proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)  # the launcher kills init; the PID namespace dies with it
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    proc.stdout.close()




def _probe(rt: SandboxRuntime) -> Protections:
    """The strongest set of protections under which a trivial Python program runs here."""
    root = os.geteuid() == 0
    full = Protections(True, not root, True, True, root, hidden_paths=True, read_only_host=True)
    # Hidden paths and a read-only host need the private /proc: through the host's, /proc/<pid>/root of any
    # process of the same uid leads to the host's tree.
    no_proc = replace(full, private_proc=False, hidden_paths=False, read_only_host=False)
    candidates = [
        full,
        replace(full, read_only_host=False),  # Linux < 5.12: no mount_setattr
        replace(full, read_only_host=False, hidden_paths=False),
        no_proc,
        replace(no_proc, private_scratch=False),
        Protections(False, False, False, False, root),
        Protections(False, False, False, False, False),
    ]
    failures = []
    for prot in dict.fromkeys(candidates):
        rt.protections = prot
        try:
            with Sandbox(rt) as box:
                argv = rt.python_argv() + ["-c", "import sys; sys.stdout.write('ok')"]
                result = box.run(argv, b"", Limits(time_limit_s=10.0, memory_mb=512))
            if result.status == "ok" and result.stdout == b"ok":
                (logger.info if prot == full else logger.warning)(prot.summary())
                return prot
            failures.append(f"{prot}: {result.status} {result.returncode}")
        except (OSError, subprocess.SubprocessError) as err:
            failures.append(f"{prot}: {err}")
    raise RuntimeError(
        "no sandbox configuration can run the interpreter "
        f"{os.path.join('<prefix>', rt._python_rel)} (set `python_executable`): " + "; ".join(failures)
    )
