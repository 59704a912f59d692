"""Adversarial programs get reward 0 within their limits and leave the host and the training process unharmed.

Small limits keep every test fast: 1 s per test, 256 MB, 8 MB files, 16 MB scratch, 64 KB of output.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from sdzero_pl.tasks.code.reward import CodeReward
from sdzero_pl.tasks.code.sandbox import Limits, Protections, Sandbox, SandboxRuntime, runtime
from tests.helpers import SETSID_DAEMON

# A small uid range of this test session's own, so that concurrent sessions never see each other's processes.
UID_BASE, UID_COUNT = 63000 + (os.getpid() % 200) * 8, 8
LIMITS = Limits(time_limit_s=1.0, memory_mb=256, file_size_mb=8, scratch_mb=16, max_output_bytes=1 << 16)
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def reward():
    verifier = CodeReward(time_limit_s=1.0, memory_mb=256, file_size_mb=8, scratch_mb=16, max_output_bytes=1 << 16,
                          num_workers=2, program_timeout_s=10.0, uid_base=UID_BASE, uid_count=UID_COUNT)
    yield verifier
    verifier.close()


@pytest.fixture(scope="module")
def rt() -> SandboxRuntime:
    return runtime(UID_BASE, UID_COUNT)


def python_block(source: str) -> str:
    return "```python\n" + textwrap.dedent(source).strip() + "\n```"


def score(reward: CodeReward, source: str, expected: str = "ok\n", stdin: str = "") -> tuple[float, str | None, float]:
    start = time.monotonic()
    result = reward([python_block(source)], [[{"input": stdin, "output": expected}]])
    return result.rewards[0], result.errors[0], time.monotonic() - start


def run_here(rt: SandboxRuntime, source: str, limits: Limits = LIMITS) -> bytes:
    """Run in THIS process's sandbox (pytest is the parent of the launcher) and return stdout."""
    with Sandbox(rt) as box:
        argv = rt.python_argv() + [box.add_file("main.py", textwrap.dedent(source).encode())]
        return box.run(argv, b"", limits).stdout


def sandbox_uid_processes() -> list[int]:
    """Host pids of live (not zombie) processes whose real uid is in the sandbox pool."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in Path(entry.path, "status").read_text().splitlines())
        except OSError:
            continue
        uid = int(fields["Uid"].split()[0])
        if UID_BASE <= uid < UID_BASE + UID_COUNT and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry.name))
    return pids


def test_root_runs_programs_under_a_pool_uid(rt):
    if not IS_ROOT:
        pytest.skip("the uid switch needs root")
    assert rt.protections.uid_switch
    uid = int(run_here(rt, "import os; print(os.getuid())"))
    assert UID_BASE <= uid < UID_BASE + UID_COUNT


def test_infinite_loop_gets_zero_within_the_time_limit(reward):
    value, error, seconds = score(reward, "while True: pass")
    assert value == 0.0 and "longer than 1s" in error
    assert seconds < 6.0


def test_fork_bomb_is_contained_and_leaves_no_process(reward):
    if not (IS_ROOT or reward.protections.user_namespace):
        pytest.skip("RLIMIT_NPROC only contains a fork bomb with a uid or user namespace of its own")
    value, _, seconds = score(reward, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert value == 0.0 and seconds < 10.0
    assert sandbox_uid_processes() == []
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_memory_hog_gets_zero(reward):
    # filling 256 MB page by page may take longer than 1 s on a loaded host: either limit ends it
    value, _, seconds = score(reward, "blocks = []\nwhile True: blocks.append(bytearray(1 << 24))\nprint('ok')")
    assert value == 0.0 and seconds < 6.0
    value, error, _ = score(reward, "x = bytearray(1 << 31); print('ok')")
    assert value == 0.0 and "exit status" in error


def test_disk_filling_is_capped_and_leaves_nothing_behind(reward):
    before = {p: set(os.listdir(p)) for p in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(p)}
    for target in ("big", "/tmp/big", "/dev/shm/big", "/var/tmp/big"):
        value, _, _ = score(reward, f"""
            with open({target!r}, "wb") as f:
                for _ in range(64):
                    f.write(b"x" * (1 << 20))
            print("ok")
        """)
        assert value == 0.0, target
    # many files, each under RLIMIT_FSIZE: the private scratch's size stops them
    value, _, _ = score(reward, """
        for i in range(64):
            with open(f"/dev/shm/part{i}", "wb") as f:
                f.write(b"x" * (4 << 20))
        print("ok")
    """)
    assert value == 0.0
    after = {p: set(os.listdir(p)) for p in before}
    new = {p: after[p] - before[p] for p in before}
    leaked = [os.path.join(p, n) for p, names in new.items() for n in names if os.lstat(os.path.join(p, n)).st_uid != 0]
    assert leaked == [] or not IS_ROOT


def test_stdout_flood_is_cut_at_the_output_cap(reward):
    value, error, seconds = score(reward, "import sys\nwhile True: sys.stdout.write('x' * 4096)")
    assert value == 0.0 and "bytes of output" in error and seconds < 6.0


def test_network_is_unreachable(reward):
    if not reward.protections.namespaces:
        pytest.skip("no network namespace on this host")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    value, _, _ = score(reward, f"""
        import socket
        s = socket.socket()
        s.settimeout(0.5)
        s.connect(("127.0.0.1", {port}))
        print("ok")
    """)
    assert value == 0.0
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


def test_files_outside_the_sandbox_are_unreadable(reward, tmp_path):
    if not reward.protections.uid_switch:
        pytest.skip("without a uid of its own the program reads whatever the trainer can")
    secret_dir = tmp_path / "private"
    secret_dir.mkdir(mode=0o700)
    secret = secret_dir / "token.txt"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    value, _, _ = score(reward, f"print(open({str(secret)!r}).read(), end='')", expected="s3cret\n")
    assert value == 0.0
    if os.stat("/root").st_mode & 0o005 == 0:
        value, _, _ = score(reward, "import os; os.listdir('/root'); print('ok')")
        assert value == 0.0


def test_environment_is_scrubbed(rt, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do_not_leak")
    out = run_here(rt, "import os; print(sorted(os.environ.items()))")
    assert b"do_not_leak" not in out and b"HF_TOKEN" not in out
    assert b"PATH" in out


def test_signalling_the_parent_or_the_trainer_fails(rt, reward):
    # here pytest itself forked the launcher: the program tries its parent, pytest, and the verifier's host pid
    out = run_here(rt, f"""
        import os, signal
        for pid in (os.getppid(), {os.getpid()}, {os.getppid()}):
            try:
                os.kill(pid, signal.SIGKILL)
                print("killed", pid)
            except OSError as err:
                print("refused", pid, err.errno)
    """)
    if rt.protections.uid_switch or rt.protections.namespaces:
        assert b"killed" not in out
    worker_pid = reward._worker.process.pid if reward._worker else None
    value, _, _ = score(reward, f"import os, signal; os.kill({os.getpid()}, signal.SIGKILL); print('ok')")
    assert value == 0.0
    if worker_pid is not None:
        assert reward._worker.process.pid == worker_pid  # the verifier process survived too


def test_everything_the_program_started_is_killed_when_it_ends(reward):
    if not (reward.protections.namespaces or reward.protections.uid_switch):
        pytest.skip("a program that leaves its process group can only be found by namespace or uid")
    value, _, seconds = score(reward, SETSID_DAEMON)
    assert value == 1.0 and seconds < 6.0
    assert sandbox_uid_processes() == []


def test_without_namespaces_or_uid_limits_still_hold():
    plain = SandboxRuntime(UID_BASE, UID_COUNT)
    plain.protections = Protections(False, False, False, False, False)
    start = time.monotonic()
    with Sandbox(plain) as box:
        argv = plain.python_argv() + [box.add_file("main.py", b"while True: print('x' * 1000)")]
        assert box.run(argv, b"", LIMITS).status == "output_limit"
        argv = plain.python_argv() + [box.add_file("loop.py", b"import os\nos.fork()\nwhile True: pass")]
        assert box.run(argv, b"", LIMITS).status == "timeout"
        argv = plain.python_argv() + [box.add_file("mem.py", b"x = bytearray(1 << 30)")]
        assert box.run(argv, b"", LIMITS).status == "exit"
    assert time.monotonic() - start < 8.0


def test_uid_switch_alone_still_kills_escaped_processes_and_sweeps_their_files():
    if not IS_ROOT:
        pytest.skip("the uid switch needs root")
    # root without CAP_SYS_ADMIN (a default Docker container) gets this mode: no namespaces, a uid of its own
    uid_only = SandboxRuntime(UID_BASE, UID_COUNT)
    uid_only.protections = Protections(False, False, False, False, True)
    marker = f"sdzero-test-leftover-{os.getpid()}"
    source = f"""
        import os, time
        open("/tmp/{marker}", "w").write("x")
        if os.fork() == 0:
            os.setsid()  # leaves the process group; still holds stdout
            time.sleep(60)
        print("ok")
    """
    start = time.monotonic()
    with Sandbox(uid_only) as box:
        result = box.run(uid_only.python_argv() + [box.add_file("main.py", textwrap.dedent(source).encode())],
                         b"", LIMITS)
    assert (result.status, result.stdout) == ("ok", b"ok\n")
    assert time.monotonic() - start < 3.0  # the run ended with the program, not at the time limit
    time.sleep(0.1)
    assert sandbox_uid_processes() == []  # its init may take a while to reap the zombie; that is not ours
    assert not os.path.exists(f"/tmp/{marker}")


def test_a_non_root_user_still_gets_a_working_sandbox():
    python, setpriv = "/usr/bin/python3", shutil.which("setpriv")
    repo = Path(__file__).resolve().parents[2]
    readable = all(p.stat().st_mode & 0o005 == 0o005 for p in [repo, *repo.parents])
    if not (IS_ROOT and setpriv and os.path.exists(python) and readable):
        pytest.skip("needs root (to drop to nobody), setpriv, /usr/bin/python3 and a world-readable checkout")
    script = textwrap.dedent("""
        from sdzero_pl.tasks.code.sandbox import Limits, Sandbox, runtime
        rt = runtime()
        print(rt.protections.summary())
        limits = Limits(time_limit_s=1.0, memory_mb=256)
        for source in ("print(input()[::-1])", "while True: pass"):
            with Sandbox(rt) as box:
                argv = rt.python_argv() + [box.add_file("main.py", source.encode())]
                result = box.run(argv, b"abc", limits)
                print(result.status, result.stdout.decode().strip())
    """)
    proc = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", script],
        capture_output=True, text=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line.rstrip() for line in proc.stdout.splitlines()]
    assert "uid_switch" not in lines[0]
    assert lines[1:] == ["ok cba", "timeout"]


@pytest.fixture
def outside_tmp():
    """A world-writable directory outside /tmp (the private scratch covers /tmp anyway); removed afterwards."""
    parent = next((p for p in ("/home", "/var/lib", "/opt") if os.path.isdir(p) and os.access(p, os.W_OK)), None)
    if parent is None:
        pytest.skip("no writable directory outside /tmp (/home, /var/lib, /opt)")
    path = Path(tempfile.mkdtemp(prefix="sdzero-test-", dir=parent))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_hidden_paths_and_a_read_only_host_hold_for_world_readable_files(outside_tmp):
    if not IS_ROOT:
        pytest.skip("the non-root case is tests/tasks/test_code_sandbox_user.py")
    hidden, open_dir = outside_tmp / "hidden", outside_tmp / "open"
    for directory in (hidden, open_dir):
        directory.mkdir(mode=0o777)
        directory.chmod(0o777)
        (directory / "note.txt").write_text("world-readable\n")
        (directory / "note.txt").chmod(0o666)
    rt = SandboxRuntime(UID_BASE, UID_COUNT, hide_paths=[str(hidden)])
    if not (rt.protections.hidden_paths and rt.protections.read_only_host):
        pytest.skip(f"this host allows less: {rt.protections.summary()}")
    out = run_here(rt, f"""
        import errno
        for path in ({str(hidden / 'note.txt')!r}, {str(open_dir / 'note.txt')!r}):
            try:
                print(open(path).read().strip())
            except OSError as err:
                print(errno.errorcode[err.errno])
        for path in ({str(open_dir / 'note.txt')!r}, {str(open_dir / 'planted')!r}):
            try:
                open(path, "a").write("x")
                print("written")
            except OSError as err:
                print(errno.errorcode[err.errno])
    """)
    assert out.decode().split() == ["ENOENT", "world-readable", "EROFS", "EROFS"]
    assert (open_dir / "note.txt").read_text() == "world-readable\n" and not (open_dir / "planted").exists()


def test_a_copied_venv_keeps_its_base_installation_visible(tmp_path):
    from sdzero_pl.tasks.code.mounts import interpreter_prefixes

    base, venv = tmp_path / "base", tmp_path / "venv"
    (base / "bin").mkdir(parents=True)
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text(f"home = {base / 'bin'}\ninclude-system-site-packages = false\n")
    assert interpreter_prefixes(str(venv)) == (str(venv), str(base))
    assert interpreter_prefixes(str(base)) == (str(base),)  # no pyvenv.cfg: the installation itself


def test_mount_plan_binds_a_keep_path_back_under_its_outermost_hidden_directory(tmp_path):
    from sdzero_pl.tasks.code.mounts import plan

    home = tmp_path / "home"
    (home / "user" / "py" / "secret").mkdir(parents=True)
    (home / "user" / "token").write_text("x")
    keep = str(home / "user" / "py")
    hide = [str(home), str(home / "user"), str(home / "user" / "token"), str(home / "user" / "py" / "secret"),
            str(tmp_path / "missing")]
    layout = plan("/nonexistent-scratch", "size=1m", (), True, hide, [keep, "/usr"], [], [])
    # nested paths are covered by the outer tmpfs already, except one inside the bound-back keep path
    assert layout.hidden == ((str(home), True), (str(home / "user" / "py" / "secret"), True))
    assert layout.keeps == ((keep, str(home)),)
    under_scratch = plan(str(tmp_path), "size=1m", (), True, hide, [keep], [], [])
    assert under_scratch.hidden == () and under_scratch.keeps == ((keep, str(tmp_path)),)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run processes as a pool uid")
def test_uid_sweep_returns_only_when_the_uids_processes_are_gone():
    from sdzero_pl.tasks.code.sandbox import _live_processes, _sweep_uid

    uid = UID_BASE + UID_COUNT - 1
    children = []
    for _ in range(20):  # SIGTERM ignored: only the sweep's SIGKILL ends them
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                time.sleep(60)
            finally:
                os._exit(0)
        children.append(pid)
    deadline = time.monotonic() + 10
    while len(_live_processes(uid)) < len(children) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(_live_processes(uid)) == sorted(children)
    _sweep_uid(uid, ())
    assert _live_processes(uid) == []  # not a moment later: on return
    for pid in children:
        os.waitpid(pid, 0)
