"""The comparison's tuning grids (pure functions): reduction, points, the choice and its tie rule, the plan's
dependencies, and that every demo grid is centred on the shipped config (today's setting is a point of it)."""

from pathlib import Path

import pytest
import yaml

from sdzero_pl.data.batching import check_question_pool
from sdzero_pl.pipelines import compare, demo, tuning
from sdzero_pl.pipelines.compare import Step, TunePlan
from sdzero_pl.pipelines.tuning import Axis, axis

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"
GRID = (axis("lr", "--model.optim.lr", [1e-4, 2e-4, 4e-4]), axis("epochs", "--trainer.max_epochs", [3, 6, 9]))


def test_points_are_row_major_with_their_flags_and_distance_from_the_shipped_setting():
    points = tuning.points(GRID)
    assert len(points) == 9 and str(points[0]) == "lr=0.0001, epochs=3" and str(points[5]) == "lr=0.0002, epochs=9"
    assert points[4].flags == ("--model.optim.lr=0.0002", "--trainer.max_epochs=6") and points[4].distance == 0
    assert [p.distance for p in points] == [2, 1, 2, 1, 0, 1, 2, 1, 2]


def test_reduced_grids_keep_the_centre_first_then_below_then_above_for_every_axis():
    assert [v for v, _ in tuning.reduce_axis(GRID[0], 2).values] == ["0.0001", "0.0002"]
    assert [v for v, _ in tuning.reduce_axis(GRID[0], 1).values] == ["0.0002"]
    assert [str(p) for p in tuning.points(GRID, (2, 1))] == ["lr=0.0001, epochs=6", "lr=0.0002, epochs=6"]
    assert tuning.points(GRID, (2, 1))[1].distance == 0
    edge = Axis("x", (("a", ()), ("b", ()), ("c", ())), 0)  # centre at the edge: then the values above it
    assert [v for v, _ in tuning.reduce_axis(edge, 2).values] == ["a", "b"]
    assert tuning.parse_shape("3x1") == (3, 1)
    for bad in ("3", "0x3", "3x3x", "ax3"):
        if bad == "3":
            with pytest.raises(ValueError, match="gives 1 axes"):
                tuning.points(GRID, tuning.parse_shape(bad))
        else:
            with pytest.raises(ValueError, match="--tune-shape"):
                tuning.parse_shape(bad)
    with pytest.raises(ValueError, match="cannot keep 4"):
        tuning.points(GRID, (4, 1))


def test_choice_takes_the_best_validation_score_and_breaks_ties_towards_the_shipped_setting():
    points = tuning.points(GRID)
    assert tuning.choose(points, [0.1, 0.2, 0.3, 0.9, 0.5, 0.4, 0.0, 0.0, 0.0]) == 3
    tied = [0.5] * 9
    assert tuning.choose(points, tied) == 4  # the shipped setting
    assert tuning.choose(points, [0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.6]) == 0  # equal distance: grid order
    assert tuning.choose(points, [0.6, 0.6, 0, 0, 0, 0, 0, 0, 0]) == 1  # nearer the centre wins the tie
    with pytest.raises(ValueError, match="one score per grid point"):
        tuning.choose(points, [0.5])
    with pytest.raises(ValueError, match="no validation score"):
        tuning.choose(points, [float("nan")] * 9)


@pytest.mark.parametrize("method", sorted(compare.DEMO_GRIDS))
def test_demo_grids_are_centred_on_the_shipped_configs(method):
    config = yaml.safe_load((DEMO / f"{method}.yaml").read_text())
    shipped = {"--model.optim.lr": config["model"]["init_args"]["optim"]["lr"],
               "--trainer.max_epochs": config["trainer"]["max_epochs"],
               "--trainer.accumulate_grad_batches": config["trainer"]["accumulate_grad_batches"]}
    centre = [p for p in tuning.points(compare.DEMO_GRIDS[method]) if p.distance == 0]
    assert len(centre) == 1 and len(tuning.points(compare.DEMO_GRIDS[method])) == 9
    for flag in centre[0].flags:
        name, value = flag.split("=")
        assert float(value) == float(shipped[name]), (method, flag)


@pytest.mark.parametrize("method", sorted(compare.DEMO_GRIDS))
def test_every_demo_grid_point_fits_its_question_pool_or_cycles_through_it(method):
    # the 96-step Phase-2 point needs 1,536 prompts from 1,024 phase-2 questions: it must say it cycles, or its data
    # module refuses to start (as the first full `--tune` run found)
    config = yaml.safe_load((DEMO / f"{method}.yaml").read_text())
    data = config["data"]["init_args"]
    if "prompts_per_epoch" not in data:  # RFT, SRT: one offline collection, no per-epoch draw
        return
    split = compare.DATASET.get(method)
    pool = demo.SPLIT_SIZES[split] if split else demo.SPLIT_SIZES["phase1"] + demo.SPLIT_SIZES["phase2"]
    for point in tuning.points(compare.DEMO_GRIDS[method]):
        flags = dict(flag.split("=") for flag in point.flags)
        epochs = int(flags.get("--trainer.max_epochs", config["trainer"]["max_epochs"]))
        reuse = flags.get("--data.reuse_questions") == "true" or data.get("reuse_questions", False)
        check_question_pool(pool, data["prompts_per_epoch"], epochs, method, str(point), reuse)


def test_grpo_updates_per_rollout_batch_are_what_the_accumulation_gives():
    data = yaml.safe_load((DEMO / "grpo.yaml").read_text())["data"]["init_args"]
    micro_batches = data["prompts_per_epoch"] * data["group_size"] * data["ppo_epochs"] // data["batch_size"]
    for label, flags in compare.DEMO_GRIDS["grpo"][1].values:
        assert int(label) == micro_batches // int(flags[0].split("=")[1])


def test_tuned_plan_runs_the_grid_first_and_final_runs_wait_on_their_grid():
    tune = TunePlan(9, {"srt": 2, "sdzero": 2, "rft": 2})
    steps = compare.plan(["base", "rft", "srt", "sdzero"], [0, 1], tune, premise=["srt"])
    assert [str(s) for s in steps[:2]] == ["9:srt:train:0", "9:srt:train:1"]
    assert len(steps) == 12 + 6 + 2 + 8 and Step(0, "srt", "premise") in steps
    assert compare.needs(Step(9, "sdzero", "train", 1), tune) == [Step(9, "srt", "eval", 0), Step(9, "srt", "eval", 1)]
    assert compare.needs(Step(0, "sdzero", "train"), tune) == [Step(0, "srt", "train"), Step(9, "sdzero", "eval", 0),
                                                              Step(9, "sdzero", "eval", 1)]
    assert compare.needs(Step(9, "rft", "eval", 1), tune) == [Step(9, "rft", "train", 1)]
    assert compare.needs(Step(0, "srt", "premise"), tune) == [Step(0, "srt", "train")]
    assert compare.needs(Step(0, "rft", "train")) == []  # untuned: as before
    assert Step.parse("9:sdzero:train:1") == Step(9, "sdzero", "train", 1)
    assert Step.parse("0:sdft:premise") == Step(0, "sdft", "premise")
    for bad in ("0:rft:premise", "0:srt:premise:1", "0:srt:train:x"):
        with pytest.raises(ValueError, match="only-step"):
            Step.parse(bad)


@pytest.mark.parametrize("argv, message", [
    (["--tune", "--suite", "qwen"], "has no validation split"),
    (["--tune", "--tune-seed", "0"], "--tune-seed"),
    (["--tune", "--tune-shape", "3"], "gives 1 axes"),
    (["--tune-questions", "0"], "--tune-questions"),
])
def test_bad_tuning_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        compare.main(argv)
    assert message in capsys.readouterr().err


def test_sigterm_stops_the_comparison_even_when_the_step_turns_it_into_system_exit(tmp_path, monkeypatch):
    # Lightning catches the interrupt inside a fit and exits with SystemExit(1): that must not read as one failed
    # step after which the next one starts (it did: `compare --jobs 1` could only be stopped with kill -9)
    import os
    import signal
    from argparse import Namespace

    from sdzero_pl.pipelines import compare, scheduler
    from sdzero_pl.pipelines.compare_plan import Step

    ran = []

    def step_like_lightning(args, step):
        ran.append(step)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            raise SystemExit(1)

    monkeypatch.setattr(compare, "run_step", step_like_lightning)
    monkeypatch.setattr(compare, "log_path", lambda args, step: tmp_path / f"{step.method}.log")
    steps = [Step(0, "srt", "train"), Step(0, "rft", "train")]
    with pytest.raises(KeyboardInterrupt):
        scheduler.run_steps(steps, jobs=1, finished=lambda s: False, needs=lambda s: [], describe=str,
                            log=lambda s: tmp_path / f"{s.method}.log",
                            run_here=lambda s: compare.run_inline(Namespace(), s), start=None)
    assert ran == steps[:1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
