"""The file system a sandboxed program sees (code reward, docs/method.md "Data and verification"): its run's mount namespace.

Built by the run's launcher right after it entered its new namespaces (as root, or in its own user namespace when
not root), before anything of the program runs:

1. every mount of the host is made read-only (``mount_setattr``, Linux >= 5.12): the program cannot change the
   trainer's files, its checkout or its virtual environment, whatever its uid may write;
2. a size-capped tmpfs over /tmp, bound over /var/tmp, /dev/shm and /run/lock: the only place it can write;
3. an empty read-only tmpfs over every hidden directory that exists (the trainer's home with its caches, /root,
   /run/user, the cache variables' directories, ``runs/`` and ``lightning_logs/`` under the working directory, and
   the paths the user adds); a hidden file gets an empty read-only file (/dev/null) instead;
4. the paths the program needs and that lie under one of those (the interpreter's prefix, the compiler's prefix)
   are bound back, read-only, at their own place;
5. the program's own directory (read-only) and the compiler's output directory (writable) are bound into the
   namespace and detached again, and the descriptors the program reaches them by (``/proc/self/fd/N``) are
   replaced with ones opened in the new namespace, so ``..`` from them never leads back to the host's tree
   (where nothing is hidden) but stops at the bind's root.

What is not hidden stays readable as before (as root: to the pool uid's permissions; not root: to everything
your uid may read). Standard library only; the launcher runs it between ``fork`` and ``exec``.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from dataclasses import dataclass
from typing import Sequence

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_LIBC.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_LIBC.syscall.restype = ctypes.c_long

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
MNT_DETACH = 2
_SYS_MOUNT_SETATTR = 442  # one number on every architecture but alpha (new syscalls share numbers since 5.1)
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 1
# statvfs f_flag bits -> the mount(2) flags that keep a mount's (possibly locked) options on a bind remount
_ST_TO_MS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
             (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))
_HIDE_OPTS = b"size=64k,nr_inodes=256,mode=0711"  # passable, not listable (to a pool uid)
# Environment variables that name caches or configuration outside the home (a token, downloaded weights).
CACHE_VARIABLES = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "HF_HOME",
                   "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_TOKEN_PATH", "TRANSFORMERS_CACHE", "TORCH_HOME",
                   "TRITON_CACHE_DIR", "PIP_CACHE_DIR", "WANDB_DIR")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def default_hidden_paths(cwd: str | None = None) -> tuple[str, ...]:
    """What a sandboxed program never sees by default: the home of this process's user (from the password
    database and $HOME), /root, /run/user, every directory a cache variable names, and the run directories
    (``runs/``, ``lightning_logs/``) under the working directory. Absolute, normalised; not resolved."""
    homes = [os.environ.get("HOME", "")]
    try:
        homes.append(pwd.getpwuid(os.geteuid()).pw_dir)
    except KeyError:  # a uid without a passwd entry (containers): $HOME is all there is
        pass
    cwd = cwd or os.getcwd()
    paths = [*homes, "/root", "/run/user", *(os.environ.get(name, "") for name in CACHE_VARIABLES),
             os.path.join(cwd, "runs"), os.path.join(cwd, "lightning_logs")]
    return tuple(dict.fromkeys(os.path.normpath(p) for p in paths if os.path.isabs(p) and os.path.normpath(p) != "/"))


def interpreter_prefixes(prefix: str) -> tuple[str, ...]:
    """What a Python at ``prefix`` reads from: the prefix itself and, for a venv made with ``--copies`` (a real
    binary with a ``pyvenv.cfg``), the base installation its ``home`` names, where the standard library lives."""
    config = os.path.join(prefix, "pyvenv.cfg")
    if not os.path.isfile(config):
        return (prefix,)
    with open(config) as handle:
        for line in handle:
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                return (prefix, os.path.dirname(os.path.realpath(value.strip())))
    return (prefix,)


def check_hide_paths(paths: Sequence[str], flag: str = "`hide_paths`") -> tuple[str, ...]:
    """Absolute, normalised paths (``~`` expanded); never ``/``."""
    checked = []
    for path in paths:
        expanded = os.path.normpath(os.path.expanduser(str(path)))
        if not os.path.isabs(expanded):
            raise ValueError(f"{flag} entries must be absolute paths, got {path!r}")
        if expanded == "/":
            raise ValueError(f"{flag} cannot hide the root directory '/'")
        checked.append(expanded)
    return tuple(checked)


def inside(path: str, parent: str) -> bool:
    """``path`` lies strictly below ``parent`` (both absolute and normalised)."""
    return path != parent and path.startswith(parent.rstrip("/") + "/")


@dataclass(frozen=True)
class Layout:
    """One run's mount plan, computed in the parent (the child only executes it). Paths are real paths."""

    scratch: str  # the private tmpfs (also the program's cwd)
    scratch_opts: bytes
    aliases: tuple[str, ...]  # bound to the scratch
    read_only: bool  # make every host mount read-only first
    hidden: tuple[tuple[str, bool], ...]  # (path, is a directory), shallow first
    keeps: tuple[tuple[str, str], ...]  # (path, the covering mount it is bound back under)
    binds: tuple[tuple[int, str, bool], ...]  # (descriptor to replace, host directory, writable)
    reopen: tuple[tuple[int, str], ...]  # (descriptor to replace, directory it is re-opened at)


def plan(
    scratch: str, scratch_opts: str, aliases: Sequence[str], read_only: bool, hide: Sequence[str],
    keeps: Sequence[str], binds: Sequence[tuple[int, str, bool]], reopen: Sequence[tuple[int, str]],
) -> Layout:
    """The layout for one run: hidden paths that exist NOW (so a ``runs/`` made after the start is hidden too),
    resolved; those already under the scratch or under another hidden directory are hidden anyway, unless they lie
    inside a path that is bound back. A keep path is bound back under its deepest covering mount."""
    covered = [scratch, *aliases]
    found: dict[str, bool] = {}
    for path in hide:
        real = os.path.realpath(path)
        if real == "/" or any(real == c or inside(real, c) for c in covered):
            continue
        if os.path.lexists(real):  # one our uid cannot even stat is closed to the program as well
            found[real] = os.path.isdir(real)
    hidden = {path: is_dir for path, is_dir in found.items()
              if not any(inside(path, other) for other, d in found.items() if d) or any(inside(path, k) for k in keeps)}
    ordered = tuple(sorted(hidden.items(), key=lambda item: item[0].count("/")))
    covers = covered + [p for p, is_dir in ordered if is_dir]
    placed = []
    for keep in keeps:
        over = [c for c in covers if inside(keep, c)]
        if over:
            placed.append((keep, max(over, key=len)))
    return Layout(scratch, scratch_opts.encode(), tuple(aliases), read_only, ordered, tuple(placed), tuple(binds),
                  tuple(reopen))


def check_keeps(keeps: Sequence[str], hide: Sequence[str]) -> None:
    """A path the program needs must not BE a hidden path: binding it back would show all of it."""
    for keep in keeps:
        for path in hide:
            if keep == os.path.realpath(path):
                raise ValueError(
                    f"{keep} is needed inside the sandbox (an interpreter's or compiler's prefix) but is also a path "
                    f"hidden from programs ({path}); use an interpreter / compiler installed in a directory of its "
                    "own (pyenv, uv, conda and system installs are), or do not hide that path"
                )


# ------------------------------------------------------------------------------ child side (between fork and exec)


def check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: bytes | None, target: str, fstype: bytes | None, flags: int, data: bytes | None, what: str) -> None:
    check(_LIBC.mount(source, target.encode(), fstype, flags, data), f"{what} ({target})")


def _remount(target: str, read_only: bool) -> None:
    """Change a bind's read-only flag, keeping its other flags (in a user namespace they may be locked)."""
    st_flags = os.statvfs(target).f_flag
    flags = MS_REMOUNT | MS_BIND | (MS_RDONLY if read_only else 0)
    for st, ms in _ST_TO_MS:
        if st_flags & st:
            flags |= ms
    if not st_flags & (os.ST_NOATIME | os.ST_RELATIME):
        flags |= MS_STRICTATIME
    _mount(None, target, None, flags, None, "remount " + ("read-only" if read_only else "writable"))


def _make_all_read_only() -> None:
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    rc = _LIBC.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), b"/",
                       ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    check(int(rc), "make every mount read-only (mount_setattr, Linux >= 5.12)")


def _mkdirs(path: str) -> None:
    """Create the missing directories of ``path``, each 0711 whatever the umask (a pool uid must pass them)."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        _mkdirs(parent)
    if not os.path.isdir(path):
        os.mkdir(path)
        os.chmod(path, 0o711)


def _bind_back(keeps: dict[str, list[str]], keep_fds: dict[str, int], cover: str) -> None:
    for keep in keeps.get(cover, ()):
        _mkdirs(keep)
        _mount(f"/proc/self/fd/{keep_fds[keep]}".encode(), keep, None, MS_BIND | MS_REC, None, "bind back")
        _remount(keep, read_only=True)


def build(layout: Layout) -> None:
    """Execute ``layout`` in a fresh mount namespace (the caller holds CAP_SYS_ADMIN there)."""
    _mount(b"none", "/", None, MS_REC | MS_PRIVATE, None, "make / private")
    # Everything to bind later is opened now, while the tree is still the host's copy.
    keep_fds = {keep: os.open(keep, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for keep, _ in layout.keeps}
    bind_fds = [os.open(src, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for _, src, _ in layout.binds]
    keeps: dict[str, list[str]] = {}
    for keep, cover in layout.keeps:
        keeps.setdefault(cover, []).append(keep)
    if layout.read_only:
        _make_all_read_only()
    _mount(b"tmpfs", layout.scratch, b"tmpfs", MS_NOSUID | MS_NODEV, layout.scratch_opts, "mount scratch")
    _bind_back(keeps, keep_fds, layout.scratch)
    for alias in layout.aliases:
        _mount(layout.scratch.encode(), alias, None, MS_BIND, None, "bind scratch")
        _bind_back(keeps, keep_fds, alias)
    for path, is_dir in layout.hidden:
        try:
            if is_dir:
                _mount(b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV, _HIDE_OPTS, "hide")
            else:
                _mount(b"/dev/null", path, None, MS_BIND, None, "hide")
        except FileNotFoundError:  # below a path hidden already (or gone since the plan): nothing to hide there
            continue
        _bind_back(keeps, keep_fds, path)
        _remount(path, read_only=True)
    for k, ((fd, _, writable), src_fd) in enumerate(zip(layout.binds, bind_fds)):
        point = os.path.join(layout.scratch, f".sdzero-bind-{k}")
        os.mkdir(point, 0o700)
        _mount(f"/proc/self/fd/{src_fd}".encode(), point, None, MS_BIND, None, "bind")
        _remount(point, read_only=not writable)
        _replace_fd(fd, point)
        check(_LIBC.umount2(point.encode(), MNT_DETACH), f"detach {point}")  # lives on through the descriptor
        os.rmdir(point)
    for fd, path in layout.reopen:
        _replace_fd(fd, path)
    for fd in [*keep_fds.values(), *bind_fds]:
        os.close(fd)


def _replace_fd(fd: int, path: str) -> None:
    new = os.open(path, os.O_PATH | os.O_DIRECTORY)
    if new != fd:
        os.dup2(new, fd)
        os.close(new)
