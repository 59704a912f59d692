"""Phase 1 trace collection: reviser context, branch switches, filtering, cleaning, budget, resume, errors.

Most tests drive the collector with a scripted rollout backend (it answers "What is a+b?" right or wrong, seeded
like a real sampler) and an exact-match verifier, so the filtering and resume logic can be checked exactly; one
test runs the real HF backend on the tiny model, one the real math reward.
"""

from __future__ import annotations

import json
import logging
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdzero_pl.core.budget import BudgetLedger
from sdzero_pl.core.models import load_model, load_tokenizer
from sdzero_pl.core.prompts import control_phrases, control_text, stop_token_ids
from sdzero_pl.core.sequences import strip_stop
from sdzero_pl.data.questions import DataError, Question
from sdzero_pl.data.records import chunk_seed, read_trace_file
from sdzero_pl.data.records import summarize as summarize_chunks
from sdzero_pl.phase1.clean import clean_traces, strip_opener, trim_repeating_tail
from sdzero_pl.phase1.collect import TOTALS, TraceCollector, load_traces
from sdzero_pl.rollout import HFRollout, Rollout, RolloutBackend
from sdzero_pl.tasks import MathReward, RewardBatch, Verifier, extract_last_boxed

PHRASES = control_phrases("paper")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class ScriptedRollout(RolloutBackend):
    """Answers the last "What is a+b?" of each prompt, right with probability ``p_right`` (seeded per call, like a
    sampler); can crash after ``fail_after`` calls. Records every prompt it was given."""

    def __init__(self, p_right: float = 0.5, fail_after: int | None = None, opener: str = "", delay_s: float = 0.0) -> None:
        super().__init__(temperature=1.0, top_p=1.0, max_new_tokens=64)
        self.p_right, self.fail_after, self.opener, self.delay_s = p_right, fail_after, opener, delay_s
        self.calls: list[list[list[int]]] = []

    def setup(self, policy, tokenizer, stop_ids) -> None:
        self.tokenizer, self.stop_ids = tokenizer, list(stop_ids)

    def generate(self, prompt_ids, seed, desc="generate", max_new_tokens=None) -> list[Rollout]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append([list(p) for p in prompt_ids])
        time.sleep(self.delay_s)
        rng, out = random.Random(seed), []
        for ids in prompt_ids:
            a, b = map(int, re.findall(r"What is (\d+)\+(\d+)", self.tokenizer.decode(ids))[-1])
            right = rng.random() < self.p_right
            text = f"{self.opener}{a}+{b}={a + b if right else a + b + 1}. \\boxed{{{a + b if right else a + b + 1}}}"
            out.append(Rollout(self.tokenizer.encode(text, add_special_tokens=False) + [self.stop_ids[0]], "stop"))
        return out


class ExactMatch(Verifier):
    """1 if the last boxed answer equals the reference string; None for the reference "UNVERIFIABLE"."""

    def __call__(self, completions, answers) -> RewardBatch:
        rewards = [None if a == "UNVERIFIABLE" else float(extract_last_boxed(c) == a) for c, a in zip(completions, answers)]
        return RewardBatch(rewards, skipped=sum(r is None for r in rewards),
                           errors=[f"reference answer {a!r} could not be parsed" if r is None else None
                                   for r, a in zip(rewards, answers)])


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def questions(n: int = 10) -> list[Question]:
    return [Question(f"q{i}", f"What is {i}+{i + 1}?", str(2 * i + 1)) for i in range(n)]


def collector(tokenizer, rollout=None, reward=None, **kwargs) -> TraceCollector:
    rollout = rollout or ScriptedRollout()
    stops = stop_token_ids(tokenizer)
    rollout.setup(None, tokenizer, stops)
    settings = dict(inits_per_question=1, revisions_per_init=3, questions_per_chunk=4, seed=0)
    settings.update(kwargs)
    return TraceCollector(rollout, reward or ExactMatch(), phrases=PHRASES, instruction=" Answer in \\boxed{}.",
                          **settings).bind(tokenizer, stops)


def summarize(state) -> dict[str, int]:
    return summarize_chunks(state, TOTALS)


def traces_of(path) -> list[dict]:
    return read_trace_file(path).of_kind("trace")


# ------------------------------------------------------------------------------------------------- collection
def test_reviser_context_is_prompt_plus_init_plus_delimiter_in_the_same_turn(tokenizer, tmp_path):
    rollout = ScriptedRollout()
    collector(tokenizer, rollout).run(tmp_path / "t.jsonl", questions(4), show_progress=False)
    init_call, revision_call = rollout.calls
    stops = stop_token_ids(tokenizer)
    scripted = ScriptedRollout()
    scripted.setup(None, tokenizer, stops)
    inits = scripted.generate(init_call, seed=chunk_seed(0, 0, "init"))
    rewards = ExactMatch()([tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in inits],
                           [q.answer for q in questions(4)]).rewards
    expected = []
    for prompt, init, reward in zip(init_call, inits, rewards):
        delimiter = tokenizer.encode(control_text(PHRASES, reward), add_special_tokens=False)
        expected += [prompt + strip_stop(init.completion_ids, stops) + delimiter] * 3
    assert revision_call == expected


@pytest.mark.parametrize("revise_correct, revise_wrong", [(True, True), (True, False), (False, True)])
def test_branch_switches_choose_which_inits_are_revised(tokenizer, tmp_path, revise_correct, revise_wrong):
    path = tmp_path / "t.jsonl"
    collector(tokenizer, revise_correct=revise_correct, revise_wrong=revise_wrong, keep_incorrect=True).run(
        path, questions(8), show_progress=False)
    state = read_trace_file(path)
    marks = state.of_kind("question")
    right = sum(q["init_rewards"][0] == 1.0 for q in marks)
    wrong = len(marks) - right
    assert 0 < right < len(marks), "the scripted sampler should give both right and wrong inits"
    assert summarize(state)["revision_generations"] == 3 * (right * revise_correct + wrong * revise_wrong)
    init_rewards = {t["init_reward"] for t in state.of_kind("trace")}
    assert init_rewards == {r for r, on in ((1.0, revise_correct), (0.0, revise_wrong)) if on}
    for trace in state.of_kind("trace"):
        assert trace["control"] == PHRASES[int(trace["init_reward"])]


def test_both_branches_off_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="revise_correct.*revise_wrong"):
        collector(tokenizer, revise_correct=False, revise_wrong=False)


def test_only_verified_revisions_are_kept_and_records_are_complete(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    collector(tokenizer).run(path, questions(8), show_progress=False)
    traces = traces_of(path)
    assert traces and all(t["revision_reward"] == 1.0 for t in traces)
    for t in traces:
        assert extract_last_boxed(t["revision"]) == str(2 * int(t["question_id"][1:]) + 1)
        for name in ("question_id", "row", "prompt", "init", "init_reward", "control", "revision", "revision_reward",
                     "prompt_tokens", "init_tokens", "revision_tokens"):
            assert name in t
        assert t["prompt_tokens"] == len(tokenizer.encode(t["prompt"], add_special_tokens=False))
    state = read_trace_file(path)
    assert sum(q["kept"] for q in state.of_kind("question")) == len(traces) == state.finished["traces"]


def test_keep_incorrect_writes_flagged_revisions_that_training_never_sees(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    collector(tokenizer, keep_incorrect=True).run(path, questions(8), show_progress=False)
    written = traces_of(path)
    assert {t["revision_reward"] for t in written} == {0.0, 1.0}
    loaded = load_traces(path)
    assert len(loaded) == sum(t["revision_reward"] == 1.0 for t in written)


def test_generations_and_tokens_reach_the_budget_ledger(tokenizer, tmp_path):
    path, ledger = tmp_path / "t.jsonl", BudgetLedger(tmp_path / "budget.json")
    rollout = ScriptedRollout()
    collector(tokenizer, rollout).run(path, questions(8), ledger=ledger, show_progress=False)
    stats = summarize(read_trace_file(path))
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved["phases"]["phase1/init"] == {"generations": 8, "tokens": stats["init_tokens"]}
    assert saved["phases"]["phase1/revision"]["generations"] == stats["revision_generations"]
    assert saved["total"]["generations"] == 8 + stats["revision_generations"] == sum(len(c) for c in rollout.calls)
    assert "generations" in BudgetLedger(tmp_path / "budget.json").summary()


def test_target_trace_count_stops_the_collection_at_a_chunk_boundary(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    collector(tokenizer, ScriptedRollout(p_right=1.0), target_traces=5).run(path, questions(12), show_progress=False)
    state = read_trace_file(path)
    assert state.finished["reason"] == "target reached"
    assert state.chunks == 1 and len(state.of_kind("question")) == 4  # 4 questions x 3 right revisions >= 5
    assert state.finished["traces"] == 12


def test_unverifiable_reference_is_counted_logged_and_skipped(tokenizer, tmp_path, caplog):
    qs = questions(4)
    qs[1] = Question("q1", qs[1].question, "UNVERIFIABLE")
    path = tmp_path / "t.jsonl"
    with caplog.at_level(logging.WARNING, logger="sdzero_pl.phase1.collect"):
        collector(tokenizer).run(path, qs, source="data/q.jsonl", show_progress=False)
    state = read_trace_file(path)
    assert summarize(state)["unverifiable"] == 1
    mark = [q for q in state.of_kind("question") if q["question_id"] == "q1"][0]
    assert mark["error"] and mark["revisions"] == 0
    assert len(state.of_kind("question")) == 4  # the others were processed
    assert "data/q.jsonl: row 2 (id q1)" in caplog.text


def test_real_math_reward_skips_a_reference_it_cannot_parse(tokenizer, tmp_path):
    qs = questions(3)
    qs[2] = Question("q2", qs[2].question, "}{")
    reward = MathReward(timeout_s=10.0)
    try:
        collector(tokenizer, reward=reward, questions_per_chunk=3).run(tmp_path / "t.jsonl", qs, show_progress=False)
    finally:
        reward.close()
    marks = read_trace_file(tmp_path / "t.jsonl").of_kind("question")
    assert [m["error"] is not None for m in marks] == [False, False, True]


# ------------------------------------------------------------------------------------------------------ resume
def test_resume_after_a_crash_writes_the_same_file_as_an_uninterrupted_run(tokenizer, tmp_path):
    clean, resumed = tmp_path / "clean.jsonl", tmp_path / "resumed.jsonl"
    collector(tokenizer).run(clean, questions(10), show_progress=False)

    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in chunk 1's revisions
        collector(tokenizer, ScriptedRollout(fail_after=3)).run(resumed, questions(10), show_progress=False)
    assert read_trace_file(resumed).chunks == 1
    with open(resumed, "ab") as handle:  # what kill -9 in the middle of chunk 1's write would leave
        handle.write(b'{"kind": "trace", "question_id": "q4"}\n{"kind": "question", "question_id": "q4"}\n{"kind": "tra')
    rollout = ScriptedRollout()
    collector(tokenizer, rollout).run(resumed, questions(10), show_progress=False)

    assert resumed.read_bytes() == clean.read_bytes()
    ids = [q["question_id"] for q in read_trace_file(resumed).of_kind("question")]
    assert ids == [f"q{i}" for i in range(10)]  # none duplicated, none missing
    assert len(rollout.calls) == 4  # only chunks 1 and 2 were generated again


KILLED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from test_collect import ScriptedRollout, collector, questions
from sdzero_pl.core.models import load_tokenizer
collector(load_tokenizer({model!r}), ScriptedRollout(delay_s=0.2), questions_per_chunk=2).run(
    {path!r}, questions(12), show_progress=False)
"""


def test_resume_after_kill_9_writes_the_same_file_as_an_uninterrupted_run(tiny_model_dir, tokenizer, tmp_path):
    clean, killed = tmp_path / "clean.jsonl", tmp_path / "killed.jsonl"
    collector(tokenizer, questions_per_chunk=2).run(clean, questions(12), show_progress=False)
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), model=tiny_model_dir, path=str(killed))
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (killed.exists() and killed.read_bytes().count(b'"kind": "chunk"') >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "the run to kill ended early"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert read_trace_file(killed).finished is None
    collector(tokenizer, questions_per_chunk=2).run(killed, questions(12), show_progress=False)
    assert killed.read_bytes() == clean.read_bytes()


def test_finished_collection_is_reused_without_generating(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    collector(tokenizer).run(path, questions(6), show_progress=False)
    before = path.read_bytes()
    state = collector(tokenizer, ScriptedRollout(fail_after=0)).run(path, questions(6), show_progress=False)
    assert path.read_bytes() == before and state.finished is not None


def test_recollect_starts_over(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    collector(tokenizer).run(path, questions(6), show_progress=False)
    rollout = ScriptedRollout()
    collector(tokenizer, rollout).run(path, questions(6), recollect=True, show_progress=False)
    assert len(rollout.calls) == 4


def test_other_settings_refuse_to_resume_and_name_the_setting(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    collector(tokenizer).run(path, questions(6), show_progress=False)
    with pytest.raises(ValueError, match=r"revisions_per_init: 3 -> 2.*recollect"):
        collector(tokenizer, revisions_per_init=2).run(path, questions(6), show_progress=False)


def test_chunk_seeds_depend_only_on_seed_chunk_and_stage():
    assert chunk_seed(0, 3, "init") == chunk_seed(0, 3, "init")
    assert len({chunk_seed(s, c, st) for s in (0, 1) for c in (0, 1) for st in ("init", "revision")}) == 8


def test_torn_last_line_is_ignored_and_a_corrupt_line_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "p", "init": "i", "control": "c", "revision": "r"}\n{"prompt": "p", "in')
    assert len(read_trace_file(path).records) == 1
    path.write_text('{"prompt": "p"}\nnot json\n{"prompt": "p"}\n')
    with pytest.raises(DataError, match=r"t.jsonl: line 2"):
        read_trace_file(path)


# ---------------------------------------------------------------------------------------------------- cleaning
def test_repeating_tail_is_cut_to_one_copy():
    block = "and so the answer is 7. "
    # the periodic run starts at the ". " before the first copy: one period from there is kept
    assert trim_repeating_tail("Compute 3+4. " + block * 20) == "Compute 3+4. and so the answer is 7"
    assert trim_repeating_tail("Solve: x=1!\n" + block * 5) == "Solve: x=1!\n" + block
    text = "A perfectly ordinary answer, \\boxed{7}, with no loop."
    assert trim_repeating_tail(text) == text
    assert trim_repeating_tail("Twice:\n" + block * 2) == "Twice:\n" + block * 2  # fewer than 3 copies: kept


@pytest.mark.parametrize("text, expected", [
    ("You're absolutely right to question this. Let us redo it.", "Let us redo it."),
    ("You are right — the sum is 7.", "The sum is 7."),
    ("Yes, you're right, it is 7.", "It is 7."),
    ("Good catch! the sum is 7.", "The sum is 7."),
    ("Thank you for pointing that out. Thanks for the patience. Redo: 7.", "Redo: 7."),
    ("Great question. 7.", "7."),
    ("The answer is 7; you are right to check.", "The answer is 7; you are right to check."),
])
def test_sycophantic_openers_are_stripped(text, expected):
    assert strip_opener(text) == expected


def test_clean_traces_switches_and_dedupe():
    block = "loop loop loop. "
    traces = [
        {"question_id": "q0", "prompt": "p", "init": "x" + block * 10, "control": "c", "revision": "Good point! 7"},
        {"question_id": "q0", "prompt": "p", "init": "x" + block, "control": "c", "revision": "7"},
        {"question_id": "q1", "prompt": "p", "init": "x", "control": "c", "revision": "7"},
    ]
    cleaned, stats = clean_traces(traces)
    assert [t["question_id"] for t in cleaned] == ["q0", "q1"]
    assert stats == {"trimmed": 1, "openers": 1, "duplicates": 1}
    raw, stats = clean_traces(traces, trim_repeats=False, strip_openers=False, dedupe=False)
    assert raw == traces and stats == {"trimmed": 0, "openers": 0, "duplicates": 0}
    assert traces[0]["revision"] == "Good point! 7"  # inputs untouched


def test_load_traces_names_file_line_and_field(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text('{"prompt": "p", "init": "i", "control": "c", "revision": "r"}\n'
                    '{"prompt": "p", "init": 3, "control": "c", "revision": "r"}\n')
    with pytest.raises(DataError, match=r"hand.jsonl: line 2: field 'init'"):
        load_traces(path)


def test_unfinished_collection_cannot_be_trained_on(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    with pytest.raises(RuntimeError):
        collector(tokenizer, ScriptedRollout(fail_after=2)).run(path, questions(8), show_progress=False)
    with pytest.raises(DataError, match="not finished"):
        load_traces(path)


# ------------------------------------------------------------------------------------------ real HF rollouts
def test_hf_rollout_collection_on_the_tiny_model_is_reproducible(tiny_model_dir, tokenizer, tmp_path):
    model = load_model(tiny_model_dir, "float32")
    stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    paths = []
    for name in ("a", "b"):
        rollout = HFRollout(temperature=1.0, max_new_tokens=12, batch_size=16, show_progress=False)
        rollout.setup(model, tokenizer, stops)
        c = TraceCollector(rollout, MathReward(), phrases=PHRASES, inits_per_question=1, revisions_per_init=2,
                           keep_incorrect=True, questions_per_chunk=3, seed=0).bind(tokenizer, stops)
        c.run(tmp_path / f"{name}.jsonl", questions(5), ledger=BudgetLedger(tmp_path / f"{name}.json"),
              show_progress=False)
        c.reward.close()
        paths.append(tmp_path / f"{name}.jsonl")
    assert paths[0].read_bytes() == paths[1].read_bytes()
    state = read_trace_file(paths[0])
    assert summarize(state)["init_generations"] == 5 and summarize(state)["revision_generations"] == 10
    assert len(state.of_kind("trace")) == 10  # keep_incorrect: every revision is written, with its reward
    for t in state.of_kind("trace"):
        assert 1 <= t["revision_tokens"] <= 12 and t["revision_finish"] in ("stop", "length")
    assert json.loads(Path(tmp_path / "a.json").read_text())["total"]["generations"] == 15
