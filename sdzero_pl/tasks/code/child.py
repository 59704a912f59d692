"""The sandbox's child side: what the forked child of :class:`sdzero_pl.tasks.code.sandbox.Sandbox` runs between
fork and exec. New namespaces (with our uid and gid mapped into a user namespace), the mounts of
:mod:`sdzero_pl.tasks.code.mounts`, then ``launcher -> init -> program`` (the launcher stays in the host's PID
namespace to report the exit status and to kill init on SIGTERM; init is the run's PID 1 and reaps orphans), and
last the program's uid, no_new_privs and resource limits. Nothing here may allocate much or take locks: it runs in
a forked copy of a possibly multi-threaded parent.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import signal
from typing import TYPE_CHECKING, Callable

from sdzero_pl.tasks.code import mounts
from sdzero_pl.tasks.code.mounts import MS_NODEV, MS_NOEXEC, MS_NOSUID, check

if TYPE_CHECKING:
    from sdzero_pl.tasks.code.sandbox import Limits, Protections

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_LIBC.unshare.argtypes = [ctypes.c_int]
_LIBC.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_NO_NEW_PRIVS = 38
INIT_FAILED = 125  # exit status of a run whose sandbox could not be set up inside the namespaces


def preexec_fn(prot: Protections, limits: Limits, nproc: int, uid: int | None, layout: mounts.Layout | None,
               cwd: str | None) -> Callable[[], None]:
    """The function the forked child runs before exec (``cwd``: the program's working directory, None to keep the
    run directory). Everything it needs is computed here, in the parent."""
    flags = 0
    if prot.namespaces:
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID | (CLONE_NEWUSER if prot.user_namespace else 0)
    cpu = math.ceil(limits.time_limit_s) + 1
    rlimits = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_STACK, (min(limits.memory_mb, 256) << 20,) * 2),
        (resource.RLIMIT_FSIZE, (limits.file_size_mb << 20,) * 2),
        (resource.RLIMIT_NPROC, (nproc, nproc)),
        (resource.RLIMIT_NOFILE, (limits.max_open_files,) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2),
    ]
    id_maps = _id_maps(os.geteuid(), os.getegid()) if prot.user_namespace else ()

    def enter_program() -> None:
        if cwd is not None:
            os.chdir(cwd)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        check(_LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")  # no set-uid binary gains anything
        for which, value in rlimits:  # RLIMIT_AS last: this forked copy of the parent may be larger
            resource.setrlimit(which, value)

    def preexec() -> None:
        if not flags:
            return enter_program()
        check(_LIBC.unshare(flags), "unshare")
        for path, data in id_maps:
            _write_proc(path, data)
        if layout is not None:
            mounts.build(layout)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        init = os.fork()
        if init:
            _launcher(init)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        try:
            if prot.private_proc:
                check(_LIBC.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount proc")
            program = os.fork()
        except BaseException:
            os._exit(INIT_FAILED)
        if program:
            _init(program)
        enter_program()

    return preexec


def _id_maps(uid: int, gid: int) -> tuple[tuple[str, bytes], ...]:
    """Map our own uid and gid into the new user namespace (the only mapping an unprivileged process may write).

    Unmapped, the run's uid is the overflow id there, and the kernel refuses to create any file on a filesystem
    mounted inside the namespace (the private scratch): EOVERFLOW, which broke every compilation."""
    return (("/proc/self/setgroups", b"deny"), ("/proc/self/uid_map", f"{uid} {uid} 1".encode()),
            ("/proc/self/gid_map", f"{gid} {gid} 1".encode()))


def _write_proc(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _launcher(init: int) -> None:
    """Host-side parent of the PID namespace: SIGTERM kills its init (and so the whole run); passes the status on."""
    signal.signal(signal.SIGTERM, lambda *_: os.kill(init, signal.SIGKILL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.closerange(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # incl. stdout: EOF comes from the program
    _, status = os.waitpid(init, 0)
    os._exit(_exit_code(status))


def _init(program: int) -> None:
    """PID 1 of the run: reaps orphans until the program exits; its exit kills everything left in the namespace."""
    os.closerange(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.chdir("/")  # its cwd was the run directory on the host's tree (/proc/1/cwd)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            os._exit(_exit_code(status))


def _exit_code(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


# --------------------------------------------------------- RLIMIT_NPROC (computed in the parent, set in the child)
def nproc_counts_per_user_namespace() -> bool:
    # Linux >= 5.14 counts RLIMIT_NPROC per user namespace, so a new one starts from zero.
    release = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    return release >= (5, 14)


def plain_nproc(limits: Limits) -> int:
    # Without a uid of its own the program shares RLIMIT_NPROC's count with every task of our uid.
    uid, tasks = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    tasks += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return tasks + limits.max_processes
