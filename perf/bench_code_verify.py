"""Throughput of the code verifier (programs per second): the sandbox against a plain unsandboxed subprocess.

    python perf/bench_code_verify.py --num-workers 2

Three batches, each run through :class:`~sdzero_pl.tasks.CodeReward` (verifier process, sandbox) and through
a reference that runs the same programs with ``subprocess.run`` (the same interpreter binary, same thread count, same
per-test time limit, no isolation at all), in the same run. The reference adds ``-S`` (no ``site``) so that it
never pays for ``.pth`` files of the interpreter's site-packages that the sandboxed runs do not load (on the
development host one of them imports certifi: +130 ms per start); that makes the ratio conservative.

- ``python``: correct, wrong, crashing and looping (time limit) Python programs;
- ``cpp``: correct and wrong C++ programs (compile + run);
- ``adversarial`` (sandbox only; unsafe to run unsandboxed): fork bomb, memory hog, disk filler, stdout flood,
  network client, parent killer, background daemon.
Both paths must agree on every reward of the shared batches, or the benchmark fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from sdzero_pl.tasks.code.reward import CodeReward, extract_code, outputs_match

SUM = "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums[1:]))\n"
PY = {
    "correct": SUM,
    "wrong": SUM.replace("sum(nums[1:])", "sum(nums[1:]) + 1"),
    "crash": "import sys\nsys.stdin.read()\nraise ValueError('boom')\n",
    "loop": "while True:\n    pass\n",
}
CPP = {
    "correct": "#include <iostream>\nint main(){long long n,x,s=0;std::cin>>n;for(int i=0;i<n;i++){std::cin>>x;s+=x;}"
    "std::cout<<s<<\"\\n\";}\n",
    "wrong": "#include <iostream>\nint main(){long long n;std::cin>>n;std::cout<<n<<\"\\n\";}\n",
}
ADVERSARIAL = {
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "memory": "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 24))\n",
    "disk": "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n",
    "flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "network": "import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=1)\nprint(6)\n",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint(6)\n",
    "daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint(6)\n",
}


def make_tests(n: int) -> list[dict[str, str]]:
    return [{"input": f"3\n{k} {k + 1} {k + 2}\n", "output": f"{3 * k + 3}\n"} for k in range(n)]


def batch(sources: dict[str, str], counts: dict[str, int], language: str) -> list[str]:
    return [f"```{language}\n{sources[name]}```" for name, count in counts.items() for _ in range(count)]


def reference(completions: list[str], tests: list[dict], time_limit_s: float, num_workers: int) -> list[float]:
    """The same verification with a plain subprocess per test: no limits but the time limit, no isolation."""

    def one(completion: str) -> float:
        language, source = extract_code(completion)
        with tempfile.TemporaryDirectory() as tmp:
            if language == "python":
                path = os.path.join(tmp, "main.py")
                with open(path, "w") as handle:
                    handle.write(source)
                argv = [os.path.realpath(sys.executable), "-I", "-S", "-B", path]
            else:
                with open(os.path.join(tmp, "main.cpp"), "w") as handle:
                    handle.write(source)
                built = subprocess.run(["g++", "-O2", "-std=c++17", "main.cpp", "-o", "main"], cwd=tmp,
                                       capture_output=True)
                if built.returncode != 0:
                    return 0.0
                argv = [os.path.join(tmp, "main")]
            for test in tests:
                try:
                    done = subprocess.run(argv, input=test["input"].encode(), capture_output=True, cwd=tmp,
                                          timeout=time_limit_s)
                except subprocess.TimeoutExpired:
                    return 0.0
                if done.returncode != 0 or not outputs_match(done.stdout, test["output"]):
                    return 0.0
        return 1.0

    with ThreadPoolExecutor(num_workers) as pool:
        return list(pool.map(one, completions))


def timed(fn, *args) -> tuple[list[float], float]:
    start = time.perf_counter()
    rewards = fn(*args)
    return rewards, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=2, help="programs verified at once (both paths)")
    parser.add_argument("--tests", type=int, default=3, help="tests per program")
    parser.add_argument("--time-limit", type=float, default=2.0, help="seconds per test (paper: 2)")
    parser.add_argument("--scale", type=int, default=1, help="multiply the batch sizes")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per path and batch (best is kept)")
    args = parser.parse_args()
    tests = make_tests(args.tests)
    s = args.scale
    batches = {
        "python": batch(PY, {"correct": 24 * s, "wrong": 12 * s, "crash": 8 * s, "loop": 2 * s}, "python"),
        "cpp": batch(CPP, {"correct": 4 * s, "wrong": 2 * s}, "cpp") if shutil.which("g++") else [],
        "adversarial": batch(ADVERSARIAL, {name: s for name in ADVERSARIAL}, "python"),
    }
    verifier = CodeReward(time_limit_s=args.time_limit, num_workers=args.num_workers, memory_mb=512)
    print(verifier.protections.summary())  # also starts the verifier process, outside the timings
    print(f"{os.cpu_count()} CPUs, {args.num_workers} workers, {args.tests} tests per program, "
          f"time limit {args.time_limit:g}s, python {sys.version.split()[0]}")
    print(f"{'batch':12s} {'programs':>8s} {'passed':>6s} {'sandbox/s':>10s} {'plain/s':>10s} {'ratio':>6s}"
          "   (programs per second; ratio = sandbox / plain)")
    for name, completions in batches.items():
        if not completions:
            continue
        answers = [tests] * len(completions)
        sandbox_s = plain_s = float("inf")
        for _ in range(args.repeat):  # alternate the two paths, keep the best of each (the host is shared)
            if name != "adversarial":
                plain, seconds = timed(reference, completions, tests, args.time_limit, args.num_workers)
                plain_s = min(plain_s, seconds)
            result, seconds = timed(lambda: verifier(completions, answers).rewards)
            sandbox_s = min(sandbox_s, seconds)
        line = f"{name:12s} {len(completions):8d} {int(sum(result)):6d} {len(completions) / sandbox_s:10.2f}"
        if name == "adversarial":
            assert sum(result) == 0, f"an adversarial program passed: {result}"
        else:
            if plain != result:
                raise SystemExit(f"{name}: sandbox rewards {result} differ from plain rewards {plain}")
            line += f" {len(completions) / plain_s:10.2f} {plain_s / sandbox_s:6.2f}"
        print(line)
    verifier.close()


if __name__ == "__main__":
    main()
