"""The code verifier as an ordinary cluster user (issue #18): not root, user namespaces allowed.

The suite runs as root, so this module creates a throwaway user (home outside /tmp, with a 0600 secret in it and
in its Hugging Face cache, a token in an $HF_HOME outside the home, a project with a ``runs/`` directory, an extra
hidden directory, an interpreter and a compiler wrapper inside the home) and runs ONE script as that user through
``setpriv``: it builds a :class:`CodeReward` from a copy of the package and scores a batch of programs (correct and
wrong C++, correct Python, programs that try to read the secrets, escape through descriptors or unmount the hiding,
write the project, and the hostile ones of ``test_code_sandbox.py``). The tests below read its JSON report.
Skipped, with the reason, where the host cannot create users or lets an ordinary user create no user namespace.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.helpers import SETSID_DAEMON

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cret-do-not-leak"
CPP_ADD = '#include <iostream>\nint main(){long long a,b;std::cin>>a>>b;std::cout<<a+b<<"\\n";}'
CPP_SUB = CPP_ADD.replace("a+b", "a-b")
READ_OR_HIDDEN = """
try:
    print(open({path!r}).read(), end="")
except OSError:
    print("hidden")
"""
# name -> (language, source, stdin, expected stdout); {home}, {project}, ... are filled in by the fixture
CASES = {
    "cpp_correct": ("cpp", CPP_ADD.replace("{", "{{").replace("}", "}}"), "1 2\n", "3\n"),
    "cpp_wrong": ("cpp", CPP_SUB.replace("{", "{{").replace("}", "}}"), "1 2\n", "3\n"),
    "python_correct": ("python", "a, b = map(int, input().split())\nprint(a + b)", "1 2\n", "3\n"),
    "reads_home_secret": ("python", "print(open({home_secret!r}).read(), end='')", "", SECRET + "\n"),
    "reads_cache_token": ("python", "print(open({cache_token!r}).read(), end='')", "", SECRET + "\n"),
    "home_secret_hidden": ("python", READ_OR_HIDDEN.format(path="{home_secret}"), "", "hidden\n"),
    "cache_token_hidden": ("python", READ_OR_HIDDEN.format(path="{cache_token}"), "", "hidden\n"),
    "hf_home_token_hidden": ("python", READ_OR_HIDDEN.format(path="{hf_token}"), "", "hidden\n"),
    "runs_secret_hidden": ("python", READ_OR_HIDDEN.format(path="{runs_secret}"), "", "hidden\n"),
    "extra_hidden_path": ("python", READ_OR_HIDDEN.format(path="{data_secret}"), "", "hidden\n"),
    "escape_through_descriptors": ("python", """
        import os
        found = []
        bases = [f"/proc/self/fd/{{fd}}" for fd in os.listdir("/proc/self/fd")] + ["/proc/1/root", "/proc/1/cwd"]
        for base in bases:
            for depth in range(8):
                try:
                    found.append(open(base + "/.." * depth + {home_secret!r}).read())
                except OSError:
                    pass
        print("found" if found else "hidden")
    """, "", "hidden\n"),
    "unmount_the_hiding": ("python", """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        results = [libc.umount2({home!r}.encode(), 2)]
        if libc.unshare(0x10000000 | 0x00020000) == 0:  # a user + mount namespace of its own: mounts are locked
            results += [libc.umount2({home!r}.encode(), 2), libc.umount2({home!r}.encode(), 0)]
        try:
            print(open({home_secret!r}).read(), end="")
        except OSError:
            print("hidden" if all(r != 0 for r in results) else "unmounted")
    """, "", "hidden\n"),
    "writes_the_project": ("python", """
        import errno
        codes = []
        for path, mode in (({project!r} + "/planted.py", "w"), ({project!r} + "/train.py", "a")):
            try:
                open(path, mode).write("import os  # planted")
                codes.append("written")
            except OSError as err:
                codes.append(errno.errorcode[err.errno])
        print(" ".join(codes))
    """, "", "EROFS EROFS\n"),
    "endless_loop": ("python", "while True: pass", "", "ok\n"),
    "fork_bomb": ("python", """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, "", "ok\n"),
    "memory_hog": ("python", "x = bytearray(1 << 31)\nprint('ok')", "", "ok\n"),
    "disk_filler": ("python", """
        with open("/var/tmp/big", "wb") as f:
            for _ in range(64):
                f.write(b"x" * (1 << 20))
        print("ok")
    """, "", "ok\n"),
    "disk_filler_many_files": ("python", """
        for i in range(64):
            with open(f"/dev/shm/part{{i}}", "wb") as f:
                f.write(b"x" * (4 << 20))
        print("ok")
    """, "", "ok\n"),
    "output_flood": ("python", "import sys\nwhile True: sys.stdout.write('x' * 4096)", "", "ok\n"),
    "signals_the_parent": ("python", """
        import os, signal
        for pid in (os.getppid(), 1):  # its init: signals from inside its own namespace do not reach it
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        killed = []
        for pid in ({script_pid}, {worker_pid}):  # the host's pids of the trainer and the verifier
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        print("killed" if killed else "ok")  # printed at all: its init (and so the run) is still alive
    """, "", "ok\n"),
    "setsid_daemon": ("python", SETSID_DAEMON, "", "ok\n"),
}

SCRIPT = r"""
import json, os, sys
from sdzero_pl.tasks.code.reward import CodeReward
from sdzero_pl.tasks.code.sandbox import runtime


def main():
    cfg = json.load(open(sys.argv[1]))
    protections = runtime(python_executable=cfg["python"]).protections
    if not protections.user_namespace:
        print(json.dumps({"skip": protections.summary()}))
        return
    reward = CodeReward(time_limit_s=1.0, memory_mb=256, file_size_mb=8, scratch_mb=16, max_output_bytes=1 << 16,
                        num_workers=2, program_timeout_s=10.0, python_executable=cfg["python"],
                        cpp_compiler=cfg["cxx"], hide_paths=[cfg["data"]])
    summary = reward.protections.summary()  # starts the verifier process and its start-up check
    worker = reward._worker.process.pid
    fill = dict(cfg["fill"], script_pid=os.getpid(), worker_pid=worker)
    names = list(cfg["cases"])
    completions, answers = [], []
    for name in names:
        language, source, stdin, expected = cfg["cases"][name]
        completions.append(f"```{language}\n" + source.format(**fill) + "\n```")
        answers.append([{"input": stdin, "output": expected}])
    batch = reward(completions, answers)
    again = reward(["```python\nprint(1)\n```"], [[{"input": "", "output": "1"}]]).rewards
    print(json.dumps({
        "summary": summary, "rewards": dict(zip(names, batch.rewards)), "errors": dict(zip(names, batch.errors)),
        "worker_survived": reward._worker.process.pid == worker and again == [1.0], "strays": strays(),
    }))
    reward.close()


def strays():
    # processes of this uid other than this script and its children (the verifier process, a resource tracker)
    uid, me, found = os.getuid(), os.getpid(), []
    for entry in os.scandir("/proc"):
        try:
            if not entry.name.isdigit() or entry.stat().st_uid != uid or int(entry.name) == me:
                continue
            fields = dict(line.split(":", 1) for line in open(f"/proc/{entry.name}/status").read().splitlines())
            cmdline = open(f"/proc/{entry.name}/cmdline").read().replace("\0", " ")
        except (OSError, ValueError):
            continue
        if int(fields["PPid"]) != me and not fields["State"].strip().startswith("Z"):
            found.append(cmdline)
    return found


if __name__ == "__main__":  # the verifier process is spawned: it imports this file as __mp_main__
    main()
"""


def _world_usable(path: Path) -> bool:
    """Every directory above ``path`` can be passed by others and the file read and run."""
    if not path.exists() or path.stat().st_mode & 0o005 != 0o005:
        return False
    return all(p.stat().st_mode & 0o001 for p in path.parents)


def _interpreter_for(user: str) -> str | None:
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        if not _world_usable(Path(candidate)):
            continue
        check = [shutil.which("setpriv"), f"--reuid={user}", f"--regid={user}", "--init-groups", candidate, "-c",
                 "import sys; sys.exit(sys.version_info < (3, 10))"]
        if subprocess.run(check, capture_output=True, cwd="/", timeout=30).returncode == 0:
            return candidate
    return None


def _user_pids(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _owned_in_shared_dirs(uid: int) -> set[str]:
    return {os.path.join(d, n) for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d) for n in os.listdir(d)
            if os.lstat(os.path.join(d, n)).st_uid == uid and n != f"sdzero-sandbox-{uid}"}


def _layout(base: Path, user: str, python: str) -> dict:
    """The user's files: home (0700) with a secret, a HF cache, a venv-style interpreter and a compiler wrapper;
    an $HF_HOME and a project with runs/ outside the home; a directory only `hide_paths` hides."""
    home, hf, project, data, pkg = (base / n for n in ("home", "hf", "project", "data", "pkg"))
    files = {
        home / "secret.txt": SECRET + "\n", home / ".cache" / "huggingface" / "token": SECRET + "\n",
        hf / "token": SECRET + "\n", project / "runs" / "secret.txt": SECRET + "\n", data / "secret.txt": SECRET + "\n",
        project / "train.py": "print('training')\n",
        home / "venv" / "pyvenv.cfg": f"home = {os.path.dirname(os.path.realpath(python))}\n",
        home / "tools" / "bin" / "g++": f"#!/bin/sh\nexec {shutil.which('g++')} \"$@\"\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if path.name == "g++" else 0o600)
    (home / "venv" / "bin").mkdir()
    shutil.copy2(os.path.realpath(python), home / "venv" / "bin" / "python3")  # a venv made with --copies
    for directory in (home, hf, project, data):
        shutil.chown(directory, user, user)
        for root, dirs, names in os.walk(directory):
            for name in dirs + names:
                shutil.chown(os.path.join(root, name), user, user)
    home.chmod(0o700)
    shutil.copytree(REPO / "sdzero_pl", pkg / "sdzero_pl", ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(base, 0o755)
    return {"home": str(home), "home_secret": str(home / "secret.txt"), "project": str(project),
            "cache_token": str(home / ".cache" / "huggingface" / "token"), "hf_token": str(hf / "token"),
            "hf": str(hf), "runs_secret": str(project / "runs" / "secret.txt"), "data": str(data),
            "data_secret": str(data / "secret.txt"), "pkg": str(pkg)}


@pytest.fixture(scope="module")
def report():
    tools = {name: shutil.which(name) for name in ("useradd", "userdel", "setpriv", "g++")}
    if os.geteuid() != 0:
        pytest.skip("creating a throwaway user needs root")
    if not all(tools.values()):
        pytest.skip(f"needs {', '.join(n for n, p in tools.items() if not p)} on PATH")
    if not os.path.isdir("/home"):
        pytest.skip("needs /home: the user's home must lie outside /tmp (the sandbox's private /tmp hides it anyway)")
    user = f"sdzt{os.getpid() % 100000}"
    base = Path(tempfile.mkdtemp(prefix=f"sdzero-{user}-", dir="/home"))
    created = subprocess.run([tools["useradd"], "--no-create-home", "--home-dir", str(base / "home"),
                              "--shell", "/bin/false", "--user-group", user], capture_output=True, text=True)
    if created.returncode != 0:
        shutil.rmtree(base)
        pytest.skip(f"cannot create a user on this host: {created.stderr.strip()}")
    uid = pwd.getpwnam(user).pw_uid
    before = _owned_in_shared_dirs(uid)  # a reused uid may own leftovers of an earlier user
    try:
        python = _interpreter_for(user)
        if python is None:
            pytest.skip("no Python >= 3.10 that an ordinary user may run (sys.executable and /usr/bin/python3)")
        paths = _layout(base, user, python)
        fill = {k: v for k, v in paths.items() if k not in ("hf", "data", "pkg")}
        cases = {name: (lang, textwrap.dedent(src).strip(), stdin, out)
                 for name, (lang, src, stdin, out) in CASES.items()}
        config = {"python": str(base / "home" / "venv" / "bin" / "python3"), "data": paths["data"], "fill": fill,
                  "cxx": str(base / "home" / "tools" / "bin" / "g++"), "cases": cases}
        (base / "config.json").write_text(json.dumps(config))
        (base / "script.py").write_text(SCRIPT)
        env = {"PATH": "/usr/bin:/bin", "HOME": paths["home"], "HF_HOME": paths["hf"], "LANG": "C.UTF-8",
               "PYTHONPATH": paths["pkg"], "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run([tools["setpriv"], f"--reuid={user}", f"--regid={user}", "--init-groups", python,
                               str(base / "script.py"), str(base / "config.json")],
                              capture_output=True, text=True, timeout=300, cwd=paths["project"], env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if "skip" in result:
            pytest.skip(f"an ordinary user gets no user namespace on this host ({result['skip']})")
        result.update(paths=paths, uid=uid, stderr=done.stderr)
        result["planted"] = os.path.exists(os.path.join(paths["project"], "planted.py"))
        result["train_py"] = Path(paths["project"], "train.py").read_text()
        result["left_in_shared_dirs"] = sorted(_owned_in_shared_dirs(uid) - before)
        yield result
    finally:
        for pid in _user_pids(uid):  # only processes of the throwaway user, i.e. ones this fixture started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run([tools["userdel"], "--force", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)  # where userdel leaves the user's group
        for path in [base, f"/tmp/sdzero-sandbox-{uid}", *(_owned_in_shared_dirs(uid) - before)]:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)


def test_an_ordinary_user_gets_user_namespaces_hiding_and_a_read_only_host(report):
    held = report["summary"].split(": ", 1)[1].split(", ")
    for protection in ("namespaces", "user_namespace", "private_scratch", "private_proc", "hidden_paths"):
        assert protection in held, report["summary"]
    assert "uid_switch" not in held


def test_cpp_compiles_as_an_ordinary_user_with_a_compiler_under_the_home(report):
    rewards, errors = report["rewards"], report["errors"]
    assert rewards["cpp_correct"] == 1.0, errors["cpp_correct"]
    assert rewards["cpp_wrong"] == 0.0 and errors["cpp_wrong"] == "test 1: wrong answer"


def test_python_runs_on_an_interpreter_under_the_home(report):
    assert report["rewards"]["python_correct"] == 1.0, report["errors"]["python_correct"]


def test_secrets_in_the_home_and_its_cache_are_unreadable(report):
    rewards, errors = report["rewards"], report["errors"]
    for name in ("reads_home_secret", "reads_cache_token"):
        assert rewards[name] == 0.0 and errors[name] == "test 1: exit status 1", (name, errors[name])
    for name in ("home_secret_hidden", "cache_token_hidden", "hf_home_token_hidden", "runs_secret_hidden",
                 "extra_hidden_path"):
        assert rewards[name] == 1.0, (name, errors[name])  # printed "hidden": the open failed
    assert SECRET not in json.dumps(report["errors"]) + report["stderr"]


def test_descriptors_and_unmounting_do_not_reveal_the_hidden_home(report):
    for name in ("escape_through_descriptors", "unmount_the_hiding"):
        assert report["rewards"][name] == 1.0, (name, report["errors"][name])


def test_the_users_own_files_are_read_only_to_the_program(report):
    if "read_only_host" not in report["summary"]:
        pytest.skip(f"no mount_setattr (Linux < 5.12): {report['summary']}")
    assert report["rewards"]["writes_the_project"] == 1.0, report["errors"]["writes_the_project"]
    assert not report["planted"] and report["train_py"] == "print('training')\n"


def test_hostile_programs_get_zero_as_an_ordinary_user(report):
    rewards, errors = report["rewards"], report["errors"]
    for name in ("endless_loop", "fork_bomb", "memory_hog", "disk_filler", "disk_filler_many_files", "output_flood"):
        assert rewards[name] == 0.0, name
    assert "longer than 1s" in errors["endless_loop"]
    assert "bytes of output" in errors["output_flood"]
    assert report["left_in_shared_dirs"] == []


def test_signals_to_the_parent_fail_and_a_setsid_daemon_dies_as_an_ordinary_user(report):
    assert report["rewards"]["signals_the_parent"] == 1.0, report["errors"]["signals_the_parent"]
    assert report["worker_survived"]
    assert report["rewards"]["setsid_daemon"] == 1.0, report["errors"]["setsid_daemon"]
    assert report["strays"] == []
