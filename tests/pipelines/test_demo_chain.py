"""The demo's chain variant: ``python -m sdzero_pl.demo --task chain``, configs/demo_chain, the ``demo_chain`` suite."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from sdzero_pl.pipelines import compare, demo
from sdzero_pl.tasks import chain

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _as_demo(text: str) -> dict:
    """A chain config read back as the default demo's: its header dropped, its paths mapped back."""
    body = text.split("\n#\n", 1)[1]
    for chain_path, demo_path in (("checkpoints/tiny-chain", "checkpoints/tiny-arith"),
                                  ("runs/demo_chain/data/train.jsonl", "runs/compare/data/train.jsonl"),
                                  ("runs/demo_chain/", "runs/demo/")):
        body = body.replace(chain_path, demo_path)
    return yaml.safe_load(body)


def test_every_chain_config_is_the_demo_config_but_for_the_model_and_the_paths():
    names = sorted(p.name for p in (CONFIGS / "demo").glob("*.yaml"))
    assert names == sorted(p.name for p in (CONFIGS / "demo_chain").glob("*.yaml"))
    for name in names:
        chain = (CONFIGS / "demo_chain" / name).read_text()
        assert "checkpoints/tiny-arith" not in chain and "runs/demo/" not in chain, name
        assert _as_demo(chain) == yaml.safe_load((CONFIGS / "demo" / name).read_text()), name


def test_the_demo_chain_suite_names_existing_configs():
    suite = compare.SUITES["demo_chain"]
    assert suite.base == "checkpoints/tiny-chain" and suite.eval_config.exists()
    assert set(suite.configs) == set(compare.METHODS[1:])
    assert all(config.parent.name == "demo_chain" and config.exists() for config, _ in suite.configs.values())


def test_the_task_flag_picks_the_chain_model_configs_and_questions(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SPLIT_SIZES", {"phase1": 8, "phase2": 16, "heldout": 8})
    calls = []

    def phase(name):
        def record(out, model, questions, seed, extra, configs):
            calls.append((name, str(model), questions.name, configs.name))
            return out / name / "hf_model"
        return record

    def evaluate(out, name, model, heldout, seed, extra, configs):
        calls.append(("eval", name, heldout.name, configs.name))
        return {"avg@4": 0.5, "pass@4": 0.5, "len_mean": 40.0}

    monkeypatch.setattr(demo, "run_phase1", phase("srt"))
    monkeypatch.setattr(demo, "run_phase2", phase("sdzero"))
    monkeypatch.setattr(demo, "evaluate", evaluate)
    args = demo.build_parser().parse_args(["--task", "chain", "--out", str(tmp_path)])
    summary = demo.run(args)
    assert calls[0] == ("srt", "checkpoints/tiny-chain", "phase1.jsonl", "demo_chain")
    assert calls[1] == ("sdzero", str(tmp_path / "seed0" / "srt" / "hf_model"), "phase2.jsonl", "demo_chain")
    assert [c[1] for c in calls[2:]] == ["base", "srt", "sdzero"] and {c[3] for c in calls} == {"demo_chain"}
    rows = [json.loads(line) for line in (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["id"] == "chain-heldout-0-0"
    assert len((tmp_path / "data" / "validation.jsonl").read_text().splitlines()) == 200
    assert summary["out"] == tmp_path / "seed0"

    default = demo.resolve(demo.build_parser().parse_args([]))
    assert (default.base, default.out, default.configs.name) == ("checkpoints/tiny-arith", Path("runs/demo"), "demo")
    chain = demo.resolve(demo.build_parser().parse_args(["--task", "chain"]))
    assert (chain.base, chain.out) == ("checkpoints/tiny-chain", Path("runs/demo_chain"))


def test_shipped_chain_model_is_small_and_scores_what_its_training_record_says():
    from sdzero_pl.data.questions import Question
    from sdzero_pl.tasks.chain import chain_split
    from tests.helpers import assert_scores_as_recorded

    shipped = CONFIGS.parent / "checkpoints" / "tiny-chain"
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 10 * 2**20
    record = (shipped / "TRAINING.md").read_text()
    assert "--task chain --retry_style localized" in record and "## Own-error retry examples" in record
    recorded = float(re.search(r"\*\*accuracy ([0-9.]+)\*\*", record).group(1))
    n = 60
    questions = [Question(p.id, p.problem, p.answer) for p in chain_split("heldout", n, 0)]
    assert_scores_as_recorded(shipped, questions, recorded, max_new_tokens=128)


def test_the_demo_chain_suite_writes_chain_questions_and_runs_on_them(tmp_path, monkeypatch):
    """``compare --suite demo_chain``: the chain's splits under <out>/data (validation too, so tuning and premises
    run), training and evaluation read them, and the evaluation uses the chain's eval config."""
    monkeypatch.setattr(chain, "DEMO_SIZES", {"phase1": 4, "phase2": 8, "heldout": 4, "validation": 4})
    calls = []
    monkeypatch.setattr(compare.demo, "cli", calls.append)  # training (demo.fit)
    monkeypatch.setattr(compare.demo, "evaluate",
                        lambda out, name, model, questions, seed, extra, configs: calls.append((questions, configs)))
    parser = compare.build_parser()
    compare.check_args(parser, parser.parse_args(["--suite", "demo_chain", "--tune"]))  # it has what tuning needs
    args = parser.parse_args(["--suite", "demo_chain", "--out", str(tmp_path)])
    compare.check_args(parser, args)
    compare.train(args, 0, "srt")
    compare.evaluate(args, 0, "base")
    compare.evaluate(args, 0, "srt", point=0)  # a grid point: the validation split
    srt, heldout, validation = calls
    data = tmp_path / "data"
    assert srt[2] == str(CONFIGS / "demo_chain" / "srt.yaml")
    assert f"--data.questions.dataset={data / 'phase1.jsonl'}" in srt
    assert "--model.model_name_or_path=checkpoints/tiny-chain" in srt
    assert heldout == (data / "heldout.jsonl", CONFIGS / "demo_chain") and validation[0] == data / "validation.jsonl"
    rows = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["id"] == "chain-heldout-0-0"
    assert len((data / "train.jsonl").read_text().splitlines()) == 12  # phase1 + phase2, the baselines' pool
