"""Benchmark adapters, scoring, generate-then-revise contexts and the ``python main.py validate`` eval command, on
local fixture files and the tiny model (never the network)."""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path
from typing import Sequence

import pytest

from sdzero_pl.cli import main
from sdzero_pl.core.artifacts import is_complete, read_manifest
from sdzero_pl.core.models import load_model, load_tokenizer
from sdzero_pl.core.prompts import control_phrases, control_text, encode_prompts
from sdzero_pl.data.questions import Question
from sdzero_pl.evaluation.benchmarks import BENCHMARKS, NORMALISERS, PAPER_BENCHMARKS, load_benchmark, resolve_benchmark
from sdzero_pl.evaluation.evaluate import EvalDataModule, EvalItem, Sampler, SampleRecord, evaluate_questions
from sdzero_pl.evaluation.metrics import BenchmarkScores, average_rows, markdown_table
from sdzero_pl.rollout import HFRollout, Rollout, RolloutBackend, split_at_stop
from sdzero_pl.tasks import MathReward, RewardBatch, Verifier

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "eval"


# ---------------------------------------------------------------------------------------------- adapters
def test_registry_holds_the_paper_benchmarks():
    assert set(PAPER_BENCHMARKS) <= set(BENCHMARKS)
    assert BENCHMARKS["openr1"].start == -500  # held-out: the last 500 rows
    assert resolve_benchmark("aime24").normalise == "integer"


def test_overrides_replace_adapter_fields_and_reject_unknown_ones():
    bench = resolve_benchmark("aime25", {"aime25": {"source": "yentinglin/aime_2025", "split": "train"}})
    assert (bench.source, bench.split, bench.name) == ("yentinglin/aime_2025", "train", "aime25")
    with pytest.raises(ValueError, match="unknown or fixed fields"):
        resolve_benchmark("aime25", {"aime25": {"colum": "x"}})
    with pytest.raises(ValueError, match="neither a known benchmark"):
        resolve_benchmark("aime2024")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_benchmark("missing/file.jsonl")


def test_hub_style_adapter_on_a_local_copy_normalises_integer_answers():
    bench = resolve_benchmark("aime24", {"aime24": {"source": str(FIXTURES / "aime_like.jsonl")}})
    questions = load_benchmark(bench).questions
    assert [q.answer for q in questions] == ["25", "7", "204"]
    assert [q.id for q in questions] == ["60", "61", "62"]


def test_local_json_with_a_column_mapping_and_boxed_answers():
    path = str(FIXTURES / "solutions.json")
    bench = resolve_benchmark(path, {"solutions": {"question_field": "question", "answer_field": "solution",
                                                   "normalise": "boxed", "start": 1}})
    questions = load_benchmark(bench).questions
    assert [q.answer for q in questions] == ["2", "3"]
    assert questions[1].question == "Name <b>three</b>."


@pytest.mark.parametrize("name, raw, expected", [
    ("integer", "025", "25"), ("integer", " 7 ", "7"), ("integer", "1/2", "1/2"),
    ("latex", "$\\frac{1}{2}$", "\\frac{1}{2}"), ("latex", "\\(x+1\\)", "x+1"), ("latex", "$", "$"),
    ("boxed", "so \\boxed{4} then \\boxed{5}", "5"), ("strip", " a ", "a"),
])
def test_answer_normalisers(name, raw, expected):
    assert NORMALISERS[name](raw) == expected


def test_data_module_rejects_overrides_of_benchmarks_it_does_not_evaluate():
    with pytest.raises(ValueError, match="not evaluated"):
        EvalDataModule(benchmarks=["aime24"], benchmark_overrides={"aime25": {"split": "test"}})


def test_data_module_shards_questions_across_ranks_without_duplicates():
    data = EvalDataModule(benchmarks=[str(FIXTURES / "sums.jsonl")], benchmark_overrides={"sums": {"id_field": "id"}},
                          max_questions=5, batch_size=2)
    shards = [data.shard(rank, 2) for rank in range(2)]
    ids = [item.question.id for shard in shards for item in shard]
    assert sorted(ids) == ["s0", "s1", "s2", "s3", "s4"]
    assert shards[0][0].text.endswith("\\boxed{}.")


# ----------------------------------------------------------------------------------------------- scoring
def _record(bench: str, qid: str, sample: int, reward, revision_reward=None) -> SampleRecord:
    return SampleRecord(bench, qid, sample, reward, tokens=10 + sample, truncated=sample == 0, completion="",
                        revision_reward=revision_reward, revision_tokens=4)


def test_scores_per_benchmark_average_and_skipped_questions():
    scores = BenchmarkScores(["a", "b"], num_samples=2, pass_k=[1, 2], revise=False)
    scores.update([_record("a", "0", 0, 1.0), _record("a", "0", 1, 0.0),  # 1 of 2
                   _record("a", "1", 0, 0.0), _record("a", "1", 1, 0.0),  # 0 of 2
                   _record("b", "0", 0, None), _record("b", "0", 1, None),  # unusable reference
                   _record("b", "1", 0, 1.0), _record("b", "1", 1, 1.0)])  # 2 of 2
    results = scores.compute()
    assert results["a"]["avg@2"] == pytest.approx(0.25)
    assert results["a"]["pass@2"] == pytest.approx(0.5)
    assert results["a"]["pass@1"] == pytest.approx(0.25)
    assert results["a"]["len_mean"] == pytest.approx(10.5)
    assert results["a"]["truncated_frac"] == pytest.approx(0.5)
    assert results["b"]["avg@2"] == 1.0 and results["b"]["skipped"] == 1 and results["b"]["questions"] == 2
    assert results["average"]["avg@2"] == pytest.approx((0.25 + 1.0) / 2)  # unweighted over benchmarks
    assert results["average"]["questions"] == 4


def test_markdown_table_shows_percentages_and_dashes_for_missing_values():
    rows = {"aime24": {"avg@8": 0.5, "len_mean": 1234.56, "questions": 30.0},
            "hmmt25": {"avg@8": float("nan"), "len_mean": 99.0, "questions": 0.0}}
    rows["average"] = average_rows(list(rows.values()))
    table = markdown_table(rows)
    assert "| aime24 | 50.0 | 1234.6 | 30 |" in table
    assert "| hmmt25 | - | 99.0 | 0 |" in table
    assert "| average | 50.0 |" in table


# ----------------------------------------------------------------------------------- generate-then-revise
class ScriptedRollout(RolloutBackend):
    """Returns scripted completions (one list per generate call) and records what it was asked."""

    def __init__(self, scripts: list[list[list[int]]], stop_ids: Sequence[int]) -> None:
        super().__init__(temperature=1.0, top_p=1.0, max_new_tokens=16)
        self.scripts, self.stop_ids, self.calls = scripts, list(stop_ids), []

    def setup(self, policy, tokenizer, stop_ids) -> None:
        pass

    def generate(self, prompt_ids, seed, desc="generate", max_new_tokens=None, on_progress=None) -> list[Rollout]:
        self.calls.append({"prompts": [list(p) for p in prompt_ids], "seed": seed, "max_new_tokens": max_new_tokens})
        return [split_at_stop(ids, self.stop_ids) for ids in self.scripts[len(self.calls) - 1]]


class WordReward(Verifier):
    def __call__(self, completions, answers) -> RewardBatch:
        return RewardBatch(rewards=[1.0 if "right" in c else 0.0 for c in completions])


def test_revision_context_is_prompt_plus_stripped_init_plus_the_reward_selected_control(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    eos = tok.eos_token_id
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    inits = [enc("right") + [eos], enc("wrong") + [eos], enc("wrong"), enc("wrong") + [eos]]  # 3rd: truncated
    revisions = [enc("right") + [eos], enc("right") + [eos], enc("wrong") + [eos], enc("right")]
    rollout = ScriptedRollout([inits, revisions], [eos])
    phrases = control_phrases("paper")
    sampler = Sampler(rollout, WordReward(), tok, [eos], num_samples=2, phrases=phrases, revise_max_new_tokens=7)
    items = [EvalItem("t", Question(str(i), f"q{i}", "1"), f"q{i}") for i in range(2)]
    records = sampler(items, None, seed=3, revise_seed=4)

    prompts = encode_prompts(tok, ["q0", "q1"])
    controls = {r: enc(control_text(phrases, r)) for r in (0.0, 1.0)}
    expected = [prompts[0] + enc("right") + controls[1.0], prompts[0] + enc("wrong") + controls[0.0],
                prompts[1] + enc("wrong") + controls[0.0], prompts[1] + enc("wrong") + controls[0.0]]
    assert rollout.calls[0]["prompts"] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert rollout.calls[1]["prompts"] == expected  # end-of-turn stripped, control tokenized on its own
    assert (rollout.calls[1]["seed"], rollout.calls[1]["max_new_tokens"]) == (4, 7)
    assert [r.reward for r in records] == [1.0, 0.0, 0.0, 0.0]
    assert [r.revision_reward for r in records] == [1.0, 1.0, 0.0, 1.0]
    assert [r.truncated for r in records] == [False, False, True, False]

    scores = BenchmarkScores(["t"], num_samples=2, pass_k=[2], revise=True)
    scores.update(records)
    row = scores.compute()["t"]
    assert row["init_acc"] == pytest.approx(0.25) and row["revised_acc"] == pytest.approx(0.75)
    assert row["correction_rate"] == pytest.approx(2 / 3)  # wrong -> right over wrong inits
    assert row["init_tokens_mean"] == pytest.approx(sum(len(i) for i in inits) / 4)


# ------------------------------------------------------------------------------------------------ command
def test_eval_configs_parse_and_instantiate(tiny_model_dir, tmp_path):
    for path in sorted(glob.glob(str(ROOT / "configs" / "eval" / "*.yaml"))):
        cli = main(["--config", path, f"--model.init_args.model_name_or_path={tiny_model_dir}",
                    f"--trainer.default_root_dir={tmp_path}"], run=False)
        assert type(cli.model).__name__ == "EvalModule", path
        assert type(cli.datamodule).__name__ == "EvalDataModule", path


def test_validate_command_end_to_end_writes_json_and_markdown(tiny_model_dir, tmp_path, monkeypatch, caplog):
    import sdzero_pl.evaluation.evaluate as evaluate

    positions = []  # where the progress bar is moved while a batch generates
    monkeypatch.setattr(evaluate, "advance_bar", lambda trainer, stage, position: positions.append((stage, position)))
    sums = str(FIXTURES / "sums.jsonl")
    main([
        "validate", "--config", str(ROOT / "configs" / "eval" / "tiny.yaml"),
        f"--model.init_args.model_name_or_path={tiny_model_dir}",
        "--model.init_args.num_samples=2", "--model.init_args.pass_k=[1, 2]",
        "--model.init_args.rollout.init_args.max_new_tokens=6", "--model.init_args.rollout.init_args.batch_size=2",
        f"--data.init_args.benchmarks=[{sums}]", "--data.init_args.benchmark_overrides={sums: {id_field: id}}",
        "--data.init_args.max_questions=3", "--data.init_args.batch_size=2",
        f"--trainer.default_root_dir={tmp_path}",
    ])
    # batch 0: 2 questions x 2 samples = 2 generate calls of 2, then 2 of revisions: a quarter each
    assert positions[:4] == [("val", 0.25), ("val", 0.5), ("val", 0.75), ("val", 1.0)] and positions[-1] == ("val", 2.0)
    assert f"{tiny_model_dir}: val results" in caplog.text  # the printed table names its model
    log_dir = tmp_path / "tensorboard" / "version_0"
    assert is_complete(log_dir) and {"eval_val.json", "eval_val.md", "samples_val_rank0.jsonl"} <= set(
        read_manifest(log_dir)["files"])
    results = json.loads((log_dir / "eval_val.json").read_text())
    row = results["results"]["sums"]
    assert row["questions"] == 3 and row["skipped"] == 0
    for key in ("avg@2", "pass@1", "pass@2", "len_mean", "truncated_frac", "init_acc", "revised_acc"):
        assert row[key] is not None and not math.isnan(row[key]), key
    assert 0.0 <= row["avg@2"] <= row["pass@2"] <= 1.0
    assert results["settings"]["temperature"] == 0.7 and results["settings"]["num_samples"] == 2
    table = (log_dir / "eval_val.md").read_text()
    assert table.startswith("| benchmark | avg@2 | pass@1 | pass@2 |") and "| sums |" in table
    samples = (log_dir / "samples_val_rank0.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 2 and "revision" in json.loads(samples[0])
    assert os.path.isfile(glob.glob(str(log_dir / "events.out.tfevents*"))[0])

    # the in-memory entry of the same evaluator (scripts, the shipped model's record) gives the same numbers
    data = EvalDataModule([sums], benchmark_overrides={"sums": {"id_field": "id"}}, max_questions=3, batch_size=2)
    reward = MathReward()
    try:
        row, records = evaluate_questions(
            load_model(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir),
            [item.question for item in data.load_items()], reward=reward, num_samples=2, pass_k=[1, 2],
            rollout=HFRollout(temperature=0.7, max_new_tokens=6, batch_size=2, show_progress=False),
            phrases=control_phrases("paper"), instruction=" Answer in \\boxed{}.", batch_size=2, seed=0, name="sums")
    finally:
        reward.close()
    assert {k: None if math.isnan(v) else v for k, v in row.items()} == results["results"]["sums"]  # JSON: NaN -> null
    assert [r.completion for r in records] == [json.loads(line)["completion"] for line in samples]
