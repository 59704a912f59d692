"""The plots command reads TensorBoard event files and self-localization JSON and writes PNGs."""

from __future__ import annotations

import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from sdzero_pl.evaluation.plots import group_tags, main, read_scalars, read_self_localization

PNG = b"\x89PNG"


def _fake_run(root) -> None:
    writer = SummaryWriter(str(root / "tb" / "version_0"))
    for step in range(5):
        writer.add_scalar("rollout/reward_mean", 0.1 * step, step)
        writer.add_scalar("rollout/len_mean", 100 - step, step)
        writer.add_scalar("train/kl_reverse_step", 1.0 / (step + 1), step)
        writer.add_scalar("eval/aime24/avg@8", 0.2 + 0.01 * step, step)
        writer.add_scalar("behaviour/phrase/wait_per_response", 0.5, step)
        writer.add_scalar("behaviour/phrase/wait_any", 0.25, step)
        writer.add_scalar("behaviour/len_tokens_mean", 90.0, step)
        writer.add_scalar("time/generate_s", 3.0, step)
    writer.close()
    for step, top in ((0, 0.3), (10, 0.5)):
        folder = root / "tb" / "version_0" / "self_localization" / f"step_{step}"
        folder.mkdir(parents=True)
        rest = (1 - top) / 19
        buckets = {"r0": {"shares": [top] + [rest] * 19}, "r1": {"shares": [0.05] * 20}}
        (folder / "data.json").write_text(json.dumps({"step": step, "buckets": buckets, "responses": []}))


def test_group_tags_sorts_metrics_into_figures():
    groups = group_tags(["val/aime24/avg@8", "test/average/pass@8", "rollout/reward_mean", "train/loss_step",
                         "train/kl_forward_epoch", "rollout/len_mean", "behaviour/len_tokens_mean",
                         "self_localization/mean_token_reward_r0", "time/generate_s", "val/x/correction_rate",
                         "eval/behaviour/phrase/wait_any"])
    assert groups["accuracy"] == ["test/average/pass@8", "val/aime24/avg@8", "val/x/correction_rate"]
    assert groups["kl"] == ["train/kl_forward_epoch", "train/loss_step"]
    assert groups["reward"] == ["rollout/reward_mean"]
    assert groups["length"] == ["rollout/len_mean"]
    assert groups["behaviour"] == ["behaviour/len_tokens_mean", "eval/behaviour/phrase/wait_any"]
    assert groups["self_localization"] == ["self_localization/mean_token_reward_r0"]


def test_plots_command_writes_every_figure(tmp_path, capsys):
    _fake_run(tmp_path / "run")
    scalars = read_scalars(str(tmp_path / "run"))
    assert [v for _, v in scalars["rollout/len_mean"]["tb/version_0"]] == [100, 99, 98, 97, 96]
    assert [r["step"] for r in read_self_localization(str(tmp_path / "run"))] == [0, 10]

    written = main([str(tmp_path / "run"), "--out", str(tmp_path / "figs")])
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == ["accuracy.png", "behaviour.png", "kl.png", "length.png", "reward.png",
                     "self_localization_buckets.png", "self_localization_over_training.png"]
    for path in written:
        with open(path, "rb") as handle:
            assert handle.read(4) == PNG
    assert capsys.readouterr().out.split() == written  # the command prints what it wrote


def test_plots_command_rejects_a_directory_without_logs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        main([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([str(tmp_path / "missing")])
