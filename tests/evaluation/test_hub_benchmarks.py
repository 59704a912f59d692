"""The math benchmarks against their hub schemas: AIME25's copy with ids, AMO-Bench's ungradable answers counted
apart (never scored 0) and its boxed gold answers, the results' ``ungraded`` column."""

from __future__ import annotations

import pytest

from sdzero_pl.data.hub import MirrorHub
from sdzero_pl.data.questions import DataError, hub_mirrors
from sdzero_pl.evaluation.benchmarks import BENCHMARKS, load_benchmark, resolve_benchmark
from sdzero_pl.evaluation.metrics import BenchmarkScores, markdown_table


@pytest.fixture(scope="module")
def hub(dryrun_workdir):
    return MirrorHub(dryrun_workdir / "hub")


@pytest.mark.parametrize("name, count", [("aime24", 30), ("aime25", 30), ("hmmt25", 30), ("math500", 500)])
def test_registry_benchmarks_load_from_schema_shaped_rows(hub, name, count):
    with hub_mirrors(hub):
        loaded = load_benchmark(resolve_benchmark(name))
    assert len(loaded.questions) == count and loaded.ungraded == 0
    assert len({q.id for q in loaded.questions}) == count


def test_aime25_is_the_copy_with_ids_and_the_other_copy_has_none(hub):
    assert (BENCHMARKS["aime25"].source, BENCHMARKS["aime25"].split) == ("math-ai/aime25", "test")
    other = {"aime25": {"source": "yentinglin/aime_2025", "split": "train"}}
    with hub_mirrors(hub):
        with pytest.raises(DataError, match="no column 'id'"):
            load_benchmark(resolve_benchmark("aime25", other))
        other["aime25"]["id_field"] = None
        assert [q.id for q in load_benchmark(resolve_benchmark("aime25", other)).questions][:2] == ["0", "1"]


def test_amobench_description_answers_are_left_out_and_counted_and_boxed_golds_unwrapped(hub):
    with hub_mirrors(hub):
        loaded = load_benchmark(resolve_benchmark("amobench"))
        sliced = load_benchmark(resolve_benchmark("amobench", {"amobench": {"stop": 10}}))
    assert loaded.ungraded == 11 and len(loaded.questions) == 39
    assert not any("Describe" in q.answer or "\\boxed" in q.answer for q in loaded.questions)
    assert all(q.answer.isdigit() for q in loaded.questions)  # "\\boxed{8}" -> "8"
    assert sliced.ungraded + len(sliced.questions) == 10


def test_the_results_table_reports_ungraded_questions_apart():
    scores = BenchmarkScores(["amobench", "aime24"], num_samples=1, pass_k=[1], revise=False, ungraded=[11, 0])
    results = scores.compute()
    assert results["amobench"]["ungraded"] == 11 and results["average"]["ungraded"] == 11
    assert "| ungraded |" in markdown_table(results) and "| 11 |" in markdown_table(results)
