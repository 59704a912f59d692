"""The code verifier's own process (:class:`~sdzero_pl.tasks.code.reward.CodeReward` runs every program from it).

Spawned lazily, replaced if it dies: no sandboxed program is ever a child of the training process, and forks come
from a small process instead of a large one holding CUDA state. It runs the start-up check (a correct C++ and a
correct Python program must pass) before the first batch and answers each (reward, programs) message with the
outcomes, the protections in force and the check's failures.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Any


def probe_message(failures: list[str], consequence: str) -> str:
    return (f"code verifier start-up check: a correct program did not pass here: {'; '.join(failures)}. Every program "
            f"in that language would score 0; {consequence}. See docs/code_verifier.md for what each mode needs.")


class VerifierProcessDied(RuntimeError):
    """The verifier process ended (killed, crashed): the caller starts a new one."""


class VerifierProcess:
    """The verifier process: receives (CodeReward, programs), answers (kind, outcomes or error message, protections,
    the start-up check's failures)."""

    def __init__(self) -> None:
        self.warned = False  # the start-up check's failures were logged (on_probe_failure: warn)
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn,), daemon=True, name="code-verifier")
        self.process.start()
        child_conn.close()

    def call(self, message: Any, timeout: float) -> Any:
        try:
            self.conn.send(message)
            answered = self.conn.poll(timeout)
            message = self.conn.recv() if answered else None
        except (EOFError, OSError):
            raise VerifierProcessDied("the code verifier process died") from None
        if not answered:
            raise TimeoutError
        return message

    def close(self) -> None:
        self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join()


def _worker_main(conn: Any) -> None:
    failures = None  # the start-up check's, once the first message brought the settings
    while True:
        try:
            reward, programs = conn.recv()
        except EOFError:
            return
        try:
            if failures is None:
                failures = reward.probe_failures()
            if failures and reward.on_probe_failure == "error":
                message = probe_message(failures, "refusing to verify (set `on_probe_failure: warn` to run anyway)")
                conn.send(("refused", message, None, failures))
                continue
            outcomes = reward.verify_programs(programs)
            conn.send(("ok", outcomes, reward.runtime().protections, failures))
        except Exception as err:  # sent back and raised there: the caller sees what broke
            conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}", None, None))
