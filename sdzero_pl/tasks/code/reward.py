"""Code reward (docs/method.md, "Data and verification"): 1 only if the completion's program passes every test of the problem.

- Extraction: the LAST fenced code block whose language is known (``python``/``py``/``python3``, ``cpp``/``c++``;
  an untagged block is Python), after any ``<think>...</think>`` section. No block: reward 0.
- Running: each test's input on stdin, in the sandbox of :mod:`sdzero_pl.tasks.code.sandbox`. Python runs on the
  trainer's own interpreter with ``-I`` (standard library only: isolated mode, no site-packages of the venv);
  C++ is compiled once per program with ``g++ -O2 -std=c++17`` inside the same sandbox.
- Comparison: stdout against the expected output, trailing whitespace of every line and trailing empty lines
  ignored. The first failing test ends the program's run (the reward is 0 either way).

Deviation from a judge: no special checkers, so problems that accept several outputs can be graded 0 wrongly.

Verification runs in ONE small worker process (spawned, started lazily, replaced if it dies) that drives up to
``num_workers`` programs at once from threads. So no sandboxed program is ever a child of the training process,
and forks come from a small process instead of a large one holding CUDA state. When it starts, that process checks
that a correct C++ and a correct Python program pass (``on_probe_failure``): a host where one language cannot run
would otherwise give every program in it reward 0, silently.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Sequence

from sdzero_pl.data.questions import Question, QuestionSource
from sdzero_pl.tasks.base import RewardBatch, Verifier
from sdzero_pl.tasks.code import sandbox as sb
from sdzero_pl.tasks.code.data import STATEMENTS, load_code_questions
from sdzero_pl.tasks.code.mounts import check_hide_paths
from sdzero_pl.tasks.code.worker import VerifierProcess, VerifierProcessDied, probe_message

logger = logging.getLogger(__name__)

LANGUAGES = {"python": "python", "py": "python", "python3": "python", "cpp": "cpp", "c++": "cpp", "": "python"}
_FENCE = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
_TIMEOUT_STATUSES = ("timeout", "program_timeout")
_PROBE_TESTS = (("2 3\n", "5\n"), ("-7 10\n", "3\n"))
_PROBE = {  # correct A+B programs: the start-up check of the verifier process
    "C++": ("cpp", '#include <iostream>\nint main() { long long a, b; std::cin >> a >> b; std::cout << a + b; }'),
    "Python": ("python", "a, b = map(int, input().split())\nprint(a + b)\n"),
}


def strip_thinking(text: str) -> str:
    """The answer part of a completion: after the last ``</think>``; before an unclosed ``<think>``."""
    end = text.rfind("</think>")
    if end != -1:
        return text[end + len("</think>") :]
    start = text.find("<think>")
    return text if start == -1 else text[:start]


def extract_code(text: str) -> tuple[str, str] | None:
    """(language, source) of the last fenced block with a known language, outside any think section; else None."""
    for match in reversed(list(_FENCE.finditer(strip_thinking(text)))):
        language = LANGUAGES.get(match.group(1).lower())
        if language is not None:
            return language, match.group(2)
    return None


def outputs_match(actual: bytes, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing empty lines (``\\r\\n`` counts as ``\\n``)."""
    return _lines(actual) == _lines(expected.encode("utf-8"))


def _lines(data: bytes) -> list[bytes]:
    lines = [line.rstrip() for line in data.split(b"\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


@dataclass(frozen=True)
class Outcome:
    reward: float
    status: str  # passed | wrong_answer | runtime_error | timeout | program_timeout | output_limit | compile_error
    detail: str | None = None


@dataclass(frozen=True)
class Program:
    language: str  # "python" | "cpp"
    source: str
    tests: tuple[tuple[str, str], ...]  # (input, expected output)


class CodeReward(Verifier):
    """Binary code reward: the last fenced program of the completion passes all tests, each in a fresh sandbox."""

    fields = ("prompt", "examples", "id")  # codeforces-cots columns

    def __init__(
        self,
        time_limit_s: float = 2.0,
        memory_mb: int = 1024,
        max_output_bytes: int = 8 << 20,
        num_workers: int = 4,
        compile_timeout_s: float = 10.0,
        program_timeout_s: float = 30.0,
        file_size_mb: int = 16,
        scratch_mb: int = 64,
        max_processes: int = 32,
        compile_memory_mb: int = 2048,
        cpp_compiler: str = "g++",
        cpp_flags: Sequence[str] = ("-O2", "-std=c++17"),
        python_executable: str | None = None,
        uid_base: int = 62000,
        uid_count: int = 512,
        hide_paths: Sequence[str] = (),
        on_probe_failure: str = "error",
        statement: str = "column",
        private_tests_field: str | None = None,
    ) -> None:
        """
        Args:
            time_limit_s: wall-clock seconds per test (paper: 2 s); CPU time is capped one second later.
            memory_mb: address-space limit of a running program, MiB (RLIMIT_AS).
            max_output_bytes: stdout a test may produce; more kills the run (reward 0).
            num_workers: programs verified at once (threads of the verifier process, each driving one sandbox).
            compile_timeout_s: wall-clock seconds for compiling one C++ program.
            program_timeout_s: wall-clock seconds for one program, compilation and all its tests together.
            file_size_mb: largest file a program may write (RLIMIT_FSIZE).
            scratch_mb: size of the private tmpfs that is the program's cwd and /tmp (where the OS allows it).
            max_processes: processes and threads a program may have (RLIMIT_NPROC, per sandbox uid as root).
            compile_memory_mb: address-space limit of the compiler, MiB.
            cpp_compiler: C++ compiler command, found on this process's PATH (or an absolute path); its prefix
                (the directory above its ``bin/``) stays readable to programs even under a hidden path.
            cpp_flags: compiler flags (paper: ``-O2 -std=c++17``).
            python_executable: interpreter for Python programs (default: the one running this code); programs
                see its standard library only. Its prefix stays readable to programs even under a hidden path.
            uid_base: first uid of the pool sandboxed programs run under (root only; unused uids, no login).
            uid_count: size of that pool: the most sandboxes that can run at once on this host.
            hide_paths: more files or directories programs must not see (absolute, ``~`` expanded), on top of
                the defaults: your home with its caches, /root, /run/user, the directories that $XDG_*_HOME,
                $HF_HOME, $HF_HUB_CACHE, $HF_DATASETS_CACHE, $HF_TOKEN_PATH, $TRANSFORMERS_CACHE, $TORCH_HOME,
                $TRITON_CACHE_DIR, $PIP_CACHE_DIR and $WANDB_DIR name, and ``runs/`` and ``lightning_logs/``
                under the working directory. Add the trainer's ``default_root_dir`` if it is elsewhere. Each is
                covered by an empty read-only tmpfs (a file: by an empty file) in the program's mount namespace,
                when the host allows one (see ``protections``: ``hidden_paths``); paths are checked before each run.
            on_probe_failure: what happens when the verifier process's start-up check (a correct C++ and a correct
                Python program must pass) fails: ``"error"`` refuses to verify (every call raises, naming the
                language and the error), ``"warn"`` logs that once and verifies anyway (that language then scores 0).
            statement: how x is read: "column" (``--data.questions.question_field`` as it is) or "codeforces" (the
                bare statement rebuilt from codeforces-cots' description / format / examples / note columns; its
                ``prompt`` column is R1's whole prompt, instructions included).
            private_tests_field: a second tests column (LiveCodeBench ``private_test_cases``: JSON or
                base64+zlib+pickle, decoded); null: only the answer column's tests are run.
        """
        for name, value in (("time_limit_s", time_limit_s), ("compile_timeout_s", compile_timeout_s),
                            ("program_timeout_s", program_timeout_s), ("compile_memory_mb", compile_memory_mb)):
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value}")
        if num_workers < 1:
            raise ValueError(f"`num_workers` must be >= 1, got {num_workers}")
        if on_probe_failure not in ("error", "warn"):
            raise ValueError(f"`on_probe_failure` must be 'error' or 'warn', got {on_probe_failure!r}")
        if statement not in STATEMENTS:
            raise ValueError(f"`statement` must be one of {STATEMENTS}, got {statement!r}")
        self.statement, self.private_tests_field = statement, private_tests_field
        self.hide_paths = check_hide_paths(hide_paths)
        self.on_probe_failure = on_probe_failure
        self.limits = sb.Limits(time_limit_s, memory_mb, file_size_mb, scratch_mb, max_output_bytes, max_processes)
        self.num_workers = num_workers
        self.compile_timeout_s = compile_timeout_s
        self.program_timeout_s = program_timeout_s
        self.compile_memory_mb = compile_memory_mb
        self.cpp_compiler = cpp_compiler
        self.cpp_flags = tuple(cpp_flags)
        self.python_executable = python_executable
        self.uid_base, self.uid_count = uid_base, uid_count
        self._worker: VerifierProcess | None = None
        self._protections: sb.Protections | None = None
        self._lock = threading.Lock()  # one batch at a time through the verifier process's pipe

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_worker"] = None  # a process is not picklable; a copy starts its own
        state["_protections"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the process may already be gone
            pass

    @property
    def protections(self) -> sb.Protections:
        """What the sandbox enforces on this host (probed by the verifier process)."""
        if self._protections is None:
            self._verify_in_worker([])
        return self._protections

    def load_questions(self, source: QuestionSource) -> list[Question]:
        """Code questions: the answer column holds the stdin/stdout tests (codeforces-cots ``examples``,
        LiveCodeBench ``public_test_cases``); see :func:`sdzero_pl.tasks.code.data.load_code_questions`. Reference
        solutions (``solution_field``) are not read for code questions."""
        if source.solution_field is not None:
            raise ValueError("`--data.questions.solution_field` is not supported with CodeReward, got "
                             f"{source.solution_field!r}")
        question, answer, id_ = self.columns(source)
        return load_code_questions(source.dataset, split=source.split, config=source.dataset_config,
                                   prompt_field=question, tests_field=answer, id_field=id_, statement=self.statement,
                                   private_tests_field=self.private_tests_field)

    def __call__(
        self, completions: Sequence[str], answers: Sequence[Any], languages: Sequence[str | None] | None = None
    ) -> RewardBatch:
        """``answers[i]`` is the list of tests ``{"input": str, "output": str}`` of row i; ``languages[i]``, when
        given and not None, overrides the language of the extracted block."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        if languages is not None and len(languages) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(languages)} languages")
        rewards: list[float | None] = [0.0] * len(completions)
        errors: list[str | None] = [None] * len(completions)
        programs: list[tuple[int, Program]] = []
        for i, (completion, tests) in enumerate(zip(completions, answers)):
            checked = check_tests(tests, f"row {i}")
            if not checked:
                rewards[i], errors[i] = None, "no tests to run"
                continue
            code = extract_code(completion)
            if code is None:
                errors[i] = "no fenced code block in a known language"
                continue
            language = code[0] if languages is None or languages[i] is None else _language(languages[i], i)
            programs.append((i, Program(language, code[1], checked)))
        outcomes = self._verify_in_worker([p for _, p in programs]) if programs else []
        timeouts = 0
        for (i, _), outcome in zip(programs, outcomes):
            rewards[i], errors[i] = outcome.reward, outcome.detail
            timeouts += outcome.status in _TIMEOUT_STATUSES
        skipped = sum(r is None for r in rewards)
        return RewardBatch(rewards=rewards, skipped=skipped, timeouts=timeouts, errors=errors)

    # ------------------------------------------------------------------------------------ in the verifier process

    def runtime(self) -> sb.SandboxRuntime:
        """This process's sandbox for these settings (the compiler's prefix is kept visible)."""
        compiler = shutil.which(self.cpp_compiler)
        keeps = () if compiler is None else tuple(dict.fromkeys(
            os.path.dirname(os.path.dirname(p)) for p in (os.path.abspath(compiler), os.path.realpath(compiler))))
        return sb.runtime(self.uid_base, self.uid_count, self.python_executable, self.hide_paths, keeps)

    def verify_programs(self, programs: Sequence[Program]) -> list[Outcome]:
        """Verify in THIS process (the verifier worker calls it; tests may too), ``num_workers`` at a time."""
        rt = self.runtime()
        if any(p.language == "cpp" for p in programs) and shutil.which(self.cpp_compiler) is None:
            raise RuntimeError(f"C++ compiler {self.cpp_compiler!r} not found on PATH (set `cpp_compiler`)")
        with ThreadPoolExecutor(self.num_workers) as pool:
            return list(pool.map(lambda p: self.verify_program(rt, p), programs))

    def probe_failures(self) -> list[str]:
        """The start-up check: ``"<language>: <error>"`` for each correct A+B program that does not pass here."""
        programs = {name: Program(language, source, _PROBE_TESTS) for name, (language, source) in _PROBE.items()}
        failures = []
        if shutil.which(self.cpp_compiler) is None:
            failures.append(f"C++: compiler {self.cpp_compiler!r} not found on PATH (set `cpp_compiler`)")
            del programs["C++"]
        outcomes = self.verify_programs(list(programs.values()))
        for name, outcome in zip(programs, outcomes):
            if outcome.reward != 1.0:
                failures.append(f"{name}: {outcome.detail or outcome.status}")
        return failures

    def verify_program(self, rt: sb.SandboxRuntime, program: Program) -> Outcome:
        deadline = time.monotonic() + self.program_timeout_s
        with sb.Sandbox(rt) as box:
            if program.language == "python":
                argv = rt.python_argv() + [box.add_file("main.py", program.source.encode("utf-8"))]
            else:
                compiled = self._compile(box, program.source, deadline)
                if isinstance(compiled, Outcome):
                    return compiled
                argv = [compiled]
            for k, (test_input, expected) in enumerate(program.tests, start=1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Outcome(0.0, "program_timeout", f"ran longer than {self.program_timeout_s:g}s in all")
                limits = replace(self.limits, time_limit_s=min(self.limits.time_limit_s, remaining))
                result = box.run(argv, test_input.encode("utf-8"), limits)
                failure = _failure(result, k, limits)
                if failure is None and not outputs_match(result.stdout, expected):
                    failure = Outcome(0.0, "wrong_answer", f"test {k}: wrong answer")
                if failure is not None:
                    return failure
        return Outcome(1.0, "passed")

    def _compile(self, box: sb.Sandbox, source: str, deadline: float) -> str | Outcome:
        """Path of the compiled program inside the sandbox, or the compile error."""
        src = box.add_file("main.cpp", source.encode("utf-8"))
        # by its path here: the sandbox's PATH is the system's only
        argv = [os.path.abspath(shutil.which(self.cpp_compiler)), *self.cpp_flags, src, "-o", "{export_dir}/main"]
        limits = replace(
            self.limits,
            time_limit_s=max(min(self.compile_timeout_s, deadline - time.monotonic()), 0.001),
            memory_mb=self.compile_memory_mb,
            file_size_mb=max(self.limits.file_size_mb, 64),
            scratch_mb=max(self.limits.scratch_mb, 256),
            max_processes=max(self.limits.max_processes, 16),
            max_output_bytes=1 << 16,
        )
        try:
            result = box.run(argv, b"", limits, export="main", capture_stderr=True)
        except sb.ExportMissing as err:
            return Outcome(0.0, "compile_error", f"compile error: {err}")
        if result.status == "timeout":
            return Outcome(0.0, "compile_error", f"compilation ran longer than {limits.time_limit_s:g}s")
        if result.status != "ok":
            message = result.stdout.decode("utf-8", "replace").replace(box.path(""), "").strip()[:400]
            return Outcome(0.0, "compile_error", f"compile error ({result.status}): {message}")
        return box.path("main")

    # ---------------------------------------------------------------------------------------- worker process

    def _verify_in_worker(self, programs: list[Program]) -> list[Outcome]:
        with self._lock:
            return self._verify_in_worker_locked(programs)

    def _verify_in_worker_locked(self, programs: list[Program]) -> list[Outcome]:
        try:
            return self._call_worker(programs)
        except VerifierProcessDied:
            # Only a program that can signal its parent (no uid switch, no PID namespace) gets here: find it alone.
            outcomes = []
            for program in programs:
                try:
                    outcomes.extend(self._call_worker([program]))
                except VerifierProcessDied:
                    outcomes.append(Outcome(0.0, "runtime_error", "the program killed the verifier process"))
            return outcomes

    def _call_worker(self, programs: list[Program]) -> list[Outcome]:
        if self._worker is None:
            self._worker = VerifierProcess()
        rounds = math.ceil(len(programs) / self.num_workers)
        budget = 120.0 + rounds * (self.program_timeout_s + 10.0)
        try:
            kind, payload, protections, failures = self._worker.call((self, programs), budget)
        except VerifierProcessDied:
            self.close()
            raise
        except TimeoutError:
            self.close()
            raise TimeoutError(f"the code verifier process gave no answer within {budget:g}s") from None
        if kind == "refused":
            raise RuntimeError(payload)
        if kind == "error":
            raise RuntimeError(f"the code verifier process failed: {payload}")
        if failures and not self._worker.warned:
            logger.warning(probe_message(failures, "verifying anyway (on_probe_failure: warn)"))
            self._worker.warned = True
        self._protections = protections
        return payload


def check_tests(tests: Any, where: str) -> tuple[tuple[str, str], ...]:
    """Tests as ((input, output), ...); raise naming ``where`` and the field if they are malformed."""
    if not isinstance(tests, (list, tuple)):
        raise TypeError(f"{where}: tests must be a list of {{'input', 'output'}} objects, got {type(tests).__name__}")
    checked = []
    for k, test in enumerate(tests):
        if not isinstance(test, dict):
            raise TypeError(f"{where}: test {k} must be an object with 'input' and 'output', got {test!r:.80}")
        for key in ("input", "output"):
            if not isinstance(test.get(key), str):
                raise TypeError(f"{where}: test {k} field {key!r} must be a string, got {test.get(key)!r:.80}")
        checked.append((test["input"], test["output"]))
    return tuple(checked)


def _language(name: str, row: int) -> str:
    language = LANGUAGES.get(str(name).lower()) if name else None
    if language is None:
        known = sorted(k for k in LANGUAGES if k)
        raise ValueError(f"row {row}: language {name!r} is not one of {known}")
    return language


def _failure(result: sb.RunResult, k: int, limits: sb.Limits) -> Outcome | None:
    if result.status == "timeout":
        return Outcome(0.0, "timeout", f"test {k}: ran longer than {limits.time_limit_s:g}s")
    if result.status == "output_limit":
        return Outcome(0.0, "output_limit", f"test {k}: more than {limits.max_output_bytes} bytes of output")
    if result.status == "exit":
        return Outcome(0.0, "runtime_error", f"test {k}: exit status {result.returncode}")
    return None
