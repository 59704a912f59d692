"""The comparison command: its plan and flags, the demo baselines'
configs (budgets, SD-Zero's settings), and a shortened run end to end (failure report, resume, worker processes)."""

import json
from pathlib import Path

import pytest
import yaml

from sdzero_pl.pipelines import compare, demo

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-arith"
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"


# ----------------------------------------------------------------------------------------- plan and flags
def test_plan_trains_srt_first_and_phase2_waits_for_it():
    steps = compare.plan(["base", "rft", "srt", "sdzero", "control"], [0, 1])
    assert [str(s) for s in steps[:2]] == ["0:srt:train", "1:srt:train"]
    assert all(s.kind == "train" for s in steps[:8]) and len(steps) == 8 + 10
    assert compare.needs(compare.Step(1, "control", "train")) == [compare.Step(1, "srt", "train")]
    assert compare.needs(compare.Step(0, "rft", "eval")) == [compare.Step(0, "rft", "train")]
    assert compare.needs(compare.Step(0, "base", "eval")) == []
    assert compare.Step.parse("2:sdft_answer:eval") == compare.Step(2, "sdft_answer", "eval")
    with pytest.raises(ValueError, match="only-step"):
        compare.Step.parse("0:base:train")


def test_help_lists_every_method_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--seeds", "--methods", "--suite", "--jobs", "--k", "--threads", "--eval-arg", "--sdft-answer-arg",
                 "--control-arg", "--only-step"):
        assert flag in out


@pytest.mark.parametrize("argv, message", [
    (["--methods", "base", "sdzero"], "sdzero trains from srt"),
    (["--jobs", "0"], "--jobs"),
    (["--seeds", "1", "1"], "--seeds"),
])
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        compare.main(argv)
    assert message in capsys.readouterr().err


def test_qwen_suite_takes_the_qwen_configs_and_the_control_gets_sdzero_flags(tmp_path, monkeypatch):
    assert all(config.exists() for config, _ in compare.SUITES["qwen"].configs.values())
    calls = []
    monkeypatch.setattr(compare, "cli", calls.append)  # evaluation
    monkeypatch.setattr(compare.demo, "cli", calls.append)  # training (demo.fit)
    parser = compare.build_parser()
    args = parser.parse_args(["--suite", "qwen", "--out", str(tmp_path), "--sdzero-arg=--trainer.max_epochs=1",
                              "--control-arg=--data.seed=7"])
    compare.check_args(parser, args)
    compare.train(args, 0, "control")
    compare.train(args, 0, "sdft_answer")
    compare.evaluate(args, 0, "base")
    control, sdft_answer, evaluation = calls
    assert control[:3] == ["fit", "--config", str(compare.CONFIGS / "qwen_sdzero_control.yaml")]
    assert f"--model.model_name_or_path={tmp_path}/seed0/srt/hf_model" in control
    assert control[-2:] == ["--trainer.max_epochs=1", "--data.seed=7"]
    assert not any(a.startswith("--data.questions.dataset") for a in control)  # the Qwen configs hold their own splits
    assert "--data.teacher_context=answer" in sdft_answer
    assert "--model.model_name_or_path=Qwen/Qwen3-4B-Instruct-2507" in sdft_answer
    assert evaluation[:3] == ["validate", "--config", str(compare.CONFIGS / "eval" / "qwen.yaml")]
    assert "--model.save_samples=true" in evaluation and "--model.num_samples=8" in evaluation


def test_qwen_suite_steps_parse_with_the_flags_compare_adds(tmp_path, monkeypatch, capsys):
    from sdzero_pl.cli import main as cli

    def print_config(argv: list[str]) -> None:  # parses and type-checks every flag, instantiates nothing
        with pytest.raises(SystemExit) as exit_info:
            cli([*argv, "--print_config"])
        assert exit_info.value.code == 0, argv

    monkeypatch.setattr(compare, "cli", print_config)
    monkeypatch.setattr(compare.demo, "cli", print_config)
    parser = compare.build_parser()
    args = parser.parse_args(["--suite", "qwen", "--out", str(tmp_path)])
    compare.check_args(parser, args)
    for method in compare.METHODS[1:]:
        compare.train(args, 0, method)
    compare.evaluate(args, 0, "sdzero")
    assert capsys.readouterr().out.count("class_path: sdzero_pl.") >= 2 * 8


# ----------------------------------------------------------------------------------------- demo configs
def _init_args(name: str) -> tuple[dict, dict, dict]:
    config = yaml.safe_load((DEMO / f"{name}.yaml").read_text())
    return config["trainer"], config["model"]["init_args"], config["data"]["init_args"]


def test_control_config_is_sdzero_but_for_the_reward_signal_and_paths():
    def strip(name: str) -> dict:
        config = yaml.safe_load((DEMO / f"{name}.yaml").read_text())
        del config["trainer"]["default_root_dir"]  # the logger and the export follow it
        config["data"]["init_args"].pop("reward_signal", None)
        return config

    assert _init_args("control")[2]["reward_signal"] == "shuffled"
    assert strip("control") == strip("sdzero")


def test_sdft_configs_use_sdzero_phase2_settings():
    _, sdzero, sdzero_data = _init_args("sdzero")
    for name, context in (("sdft", "demonstration"), ("sdft_answer", "answer")):
        _, model, data = _init_args(name)
        assert data["teacher_context"] == context
        assert model["optim"]["lr"] == sdzero["optim"]["lr"], name
        for key in ("top_k", "divergence"):
            assert model[key] == sdzero[key], (name, key)
        for key in ("prompts_per_epoch", "batch_size"):
            assert data[key] == sdzero_data[key], (name, key)
    assert _init_args("sdft")[2]["questions"]["solution_field"] == "solution"


def test_baselines_roughly_match_sdzero_generation_budget():
    srt_trainer, _, srt = _init_args("srt")
    sdzero_trainer, _, sdzero = _init_args("sdzero")
    reference = (srt["questions"]["num_questions"] * srt["inits_per_question"] * (1 + srt["revisions_per_init"])
                 + sdzero_trainer["max_epochs"] * sdzero["prompts_per_epoch"])
    budgets = {"rft": lambda t, d: d["questions"]["num_questions"] * d["samples_per_question"],
               "grpo": lambda t, d: t["max_epochs"] * d["prompts_per_epoch"] * d["group_size"],
               "sdft": lambda t, d: t["max_epochs"] * d["prompts_per_epoch"],
               "sdft_answer": lambda t, d: t["max_epochs"] * d["prompts_per_epoch"]}
    for name, budget in budgets.items():
        trainer, _, data = _init_args(name)
        assert 0.8 <= budget(trainer, data) / reference <= 1.25, (name, budget(trainer, data), reference)
    pool = demo.SPLIT_SIZES["phase1"] + demo.SPLIT_SIZES["phase2"]
    assert all(_init_args(name)[2]["questions"]["num_questions"] <= pool for name in ("rft", "grpo"))


# ------------------------------------------------------------------------------------------------ end to end
SHORT = ["--srt-arg=--data.questions.num_questions=8", "--srt-arg=--data.questions_per_chunk=8", "--srt-arg=--data.min_traces=0",
         "--srt-arg=--trainer.max_epochs=1", "--srt-arg=--trainer.enable_progress_bar=false",
         "--sdzero-arg=--trainer.max_epochs=2", "--sdzero-arg=--data.prompts_per_epoch=8",
         "--sdzero-arg=--data.batch_size=8", "--sdzero-arg=--trainer.enable_progress_bar=false",
         "--rft-arg=--data.questions_per_chunk=8", "--rft-arg=--data.min_samples=0",
         "--rft-arg=--trainer.max_epochs=1", "--rft-arg=--trainer.enable_progress_bar=false",
         "--eval-arg=--data.max_questions=8", "--eval-arg=--trainer.enable_progress_bar=false"]


def test_shortened_comparison_reports_a_failure_resumes_and_writes_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SPLIT_SIZES", {"phase1": 8, "phase2": 16, "heldout": 8})
    monkeypatch.setattr(demo, "VALIDATION_SIZE", 8)
    argv = ["--out", str(tmp_path), "--base", str(SHIPPED), "--seeds", "0", "1", "--k", "2",
            "--methods", "base", "rft", "srt", "sdzero", "--tune", "--tune-shape", "2x1", "--tune-seed", "7",
            "--premise-questions", "4", *SHORT]
    # RFT broken (0 questions): named with its log; every other step finishes, and no table is written
    assert compare.main([*argv, "--rft-arg=--data.questions.num_questions=0"]) == 1
    out = capsys.readouterr().out
    assert f"seed 7 rft grid point 0 (lr=0.0005, epochs=6) train failed: see {tmp_path}/tune/seed7/rft-p0.log" in out
    assert "seed 7 rft grid point 1 (lr=0.001, epochs=6) eval not run: rft failed" in out
    assert "seed 0 rft train not run: rft failed" in out and "seed 1 rft eval not run: rft failed" in out
    assert "num_questions" in (tmp_path / "tune" / "seed7" / "rft-p0.log").read_text()
    assert not (tmp_path / "comparison.md").exists() and (tmp_path / "seed1" / "sdzero" / "hf_model").is_dir()
    # SD-Zero's grid points start from the SRT point chosen on validation; the final SRT runs use that setting
    srt_scores = [json.loads((tmp_path / "tune" / "seed7" / "srt" / f"p{i}" / "eval" / "validation" /
                              "eval_val.json").read_text())["results"]["average"]["avg@2"] for i in (0, 1)]
    best = 1 if srt_scores[1] >= srt_scores[0] else 0  # ties: the shipped setting (centre, p1)
    configs = list((tmp_path / "tune" / "seed7" / "sdzero" / "p0").rglob("config.yaml"))
    assert configs, "LightningCLI saves the run's config"
    start = yaml.safe_load(configs[0].read_text())["model"]["init_args"]["model_name_or_path"]
    assert start == str(tmp_path / "tune" / "seed7" / "srt" / f"p{best}" / "hf_model")
    assert "probe" in json.loads((tmp_path / "seed0" / "srt" / "premise" / "premise.json").read_text())["measured"]
    # SRT's second grid point reused the first one's finished traces (same settings, same seed), and its data
    # module accepted them: the same budget, recomputed from the file
    srt_grid = tmp_path / "tune" / "seed7" / "srt"
    for name in ("traces.jsonl", "budget.json"):
        assert (srt_grid / "p1" / "srt_data" / name).read_bytes() == (srt_grid / "p0" / "srt_data" / name).read_bytes()
    assert "srt grid point 1: the finished collection of grid point 0 reused" in (
        tmp_path / "tune" / "seed7" / "srt-p1.log").read_text()
    assert "the finished collection of grid point" not in (tmp_path / "tune" / "seed7" / "srt-p0.log").read_text()

    # fixed: only RFT's steps run again (2 grid points trained and validated, then 2 seeds trained and evaluated)
    assert compare.main([*argv, "--rft-arg=--data.questions.num_questions=4"]) == 0
    out = capsys.readouterr().out
    assert "28 steps, 20 finished before (reused), 8 to run" in out and out.count("rft train: done in") == 2
    assert out.count("rft grid point") == 4
    table = (tmp_path / "comparison.md").read_text()
    saved = json.loads((tmp_path / "comparison.json").read_text())
    rows = saved["rows"]
    assert list(rows) == ["base", "rft", "srt", "sdzero"]
    results = table.split("Tuning (validation split")[0]  # the results table, without the tuning table below it
    for label in ("base", "RFT", "SRT (Phase 1)", "SD-Zero"):
        assert f"| {label} |" in results or f"| {label} (premise fails) |" in results
    assert "| p (seeds x questions) | p (seed means) | p (questions) |" in table and "reference" in table
    assert "95% interval (seeds x questions)" in table and "ci_low" in rows["rft"]["vs_sdzero"]
    assert rows["base"]["generations"]["mean"] == 0
    assert rows["rft"]["generations"]["per_seed"] == {"0": 16, "1": 16}  # 4 questions x 4 samples
    assert rows["srt"]["generations"]["mean"] == 32  # 8 x (1 init + 3 revisions)
    assert rows["sdzero"]["generations"]["mean"] == 32 + 16  # cumulative: Phase 1 + 2 epochs x 8 rollouts
    assert rows["sdzero"]["tokens"]["mean"] > rows["srt"]["tokens"]["mean"] > 0
    for method in ("base", "rft", "srt"):
        test = rows[method]["vs_sdzero"]
        assert test["questions"] == 8 and 0 < test["p_value"] <= 1 and -100 <= test["mean_diff_points"] <= 100
    assert "vs_sdzero" not in rows["sdzero"]
    for row in rows.values():
        assert set(row["avg@2"]["per_seed"]) == {"0", "1"} and 0 <= row["avg@2"]["mean"] <= 1
        assert row["pass@2"]["mean"] >= row["avg@2"]["mean"]
    assert saved["settings"]["seeds"] == [0, 1] and saved["settings"]["k"] == 2
    # tuning: every grid point's validation score, the chosen one, and its setting on the final rows
    for method in ("rft", "srt", "sdzero"):
        record = saved["tuning"][method]
        assert [p["setting"].split(",")[0] for p in record["points"]] == [
            {"rft": "lr=0.0005", "srt": "lr=5e-05", "sdzero": "lr=1.5e-05"}[method],
            {"rft": "lr=0.001", "srt": "lr=0.0001", "sdzero": "lr=3e-05"}[method]]
        assert record["seed"] == 7 and record["questions"] == 8 and 0 <= record["points"][0]["score"] <= 1
        assert rows[method]["setting"] == record["points"][record["chosen"]]["setting"]
    assert saved["tuning"]["srt"]["chosen"] == best and rows["base"]["setting"] is None
    srt_setting = saved["tuning"]["srt"]["points"][best]["setting"]
    assert saved["tuning"]["sdzero"]["start"] == {"method": "srt", "setting": srt_setting}
    assert "start" not in saved["tuning"]["rft"] and f"| SD-Zero (from SRT (Phase 1) {srt_setting}) |" in table
    assert "rft grid point 1: the finished collection of grid point 0 reused" in (
        tmp_path / "tune" / "seed7" / "rft-p1.log").read_text()
    assert "| setting (chosen on validation) | premise check |" in table and "Tuning (validation split" in table
    # premises: SD-Zero's measured by the probe of each seed's SRT model; the stated ones say so
    premise = rows["sdzero"]["premise"]
    assert premise["holds"] in (True, False) and len(premise["per_seed"]) == 2
    assert premise["measured"]["wrong"] + premise["measured"]["right"] == 2 * 4
    assert rows["rft"]["premise"]["rule"] == "stated" and "reviser after wrong answers" in table
    assert list((tmp_path / "seed0" / "sdzero" / "eval" / "heldout").glob("samples_val_rank0.jsonl"))

    # everything finished: a third run trains and evaluates nothing and gives the same table
    monkeypatch.setattr(compare, "cli", lambda *a, **k: pytest.fail("a finished step was run again"))
    monkeypatch.setattr(demo, "cli", lambda *a, **k: pytest.fail("a finished step was run again"))
    assert compare.main([*argv, "--rft-arg=--data.questions.num_questions=4"]) == 0
    assert (tmp_path / "comparison.md").read_text() == table

    # a final run trained with another setting than validation now chooses is an error, not silently reused
    (tmp_path / "seed0" / "rft" / "setting.json").write_text(json.dumps({"setting": "lr=9, epochs=1", "flags": []}))
    assert compare.main([*argv, "--rft-arg=--data.questions.num_questions=4"]) == 1
    assert "seed 0 rft train failed" in capsys.readouterr().out
    log = (tmp_path / "seed0" / "rft.log").read_text()
    assert "was trained with setting lr=9, epochs=1, validation now chooses" in log


def test_parallel_workers_run_steps_in_their_own_processes_and_logs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SPLIT_SIZES", {"phase1": 8, "phase2": 16, "heldout": 4})
    argv = ["--out", str(tmp_path), "--base", str(SHIPPED), "--seeds", "0", "1", "--k", "1", "--methods", "base",
            "--jobs", "2", "--eval-arg=--data.max_questions=4", "--eval-arg=--trainer.enable_progress_bar=false"]
    assert compare.main(argv) == 0
    out = capsys.readouterr().out
    assert "[2/2] seed" in out and "base eval: done in" in out
    rows = json.loads((tmp_path / "comparison.json").read_text())["rows"]
    assert set(rows["base"]["avg@1"]["per_seed"]) == {"0", "1"}
    assert "n/a" in (tmp_path / "comparison.md").read_text()  # no SD-Zero row: no paired test
    for seed in (0, 1):
        assert (tmp_path / f"seed{seed}" / "base.log").stat().st_size > 0


def test_a_grid_point_reuses_only_a_finished_collection_and_never_across_data_flags(tmp_path, monkeypatch):
    args = compare.build_parser().parse_args(["--out", str(tmp_path), "--tune", "--tune-shape", "2x1"])
    args.tune_shape = compare.tuning.parse_shape("2x1")
    header = json.dumps({"kind": "header", "version": 1, "method": "rft", "settings": {"seed": 1}}) + "\n"
    chunk = json.dumps({"kind": "chunk", "chunk": 0}) + "\n"
    source = compare.run_dir(args, 7, "rft", 0) / "rft_data" / "samples.jsonl"
    source.parent.mkdir(parents=True)
    source.write_text(header + chunk)  # interrupted: no `finished` line
    target = compare.run_dir(args, 7, "rft", 1) / "rft_data" / "samples.jsonl"
    compare.share_collection(args, 7, "rft", 1)
    assert not target.exists()
    source.write_text(header + chunk + json.dumps({"kind": "finished", "questions": 1, "kept": 0}) + "\n")
    compare.share_collection(args, 7, "sdzero", 1)  # no collection of its own (Phase 2 samples on-policy)
    assert not (compare.run_dir(args, 7, "sdzero", 1) / "rft_data").exists()
    monkeypatch.setattr(compare, "setting_flags", lambda *a: ["--data.samples_per_question=8"])
    compare.share_collection(args, 7, "rft", 1)  # a grid axis that changes the data: collected again
    assert not target.exists()
    monkeypatch.undo()
    compare.share_collection(args, 7, "rft", 1)
    assert target.read_bytes() == source.read_bytes() and not list(target.parent.glob("*.tmp"))
