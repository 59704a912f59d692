"""Token-level self-localization logger: pure pieces on hand-made inputs, then a tiny Phase-2 run that proves the
analysis callbacks (self-localization, behaviour, periodic benchmark eval) leave the trained weights, the RNG stream
and the module modes untouched."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks import BenchmarkEval, RolloutBehaviourLogger, SelfLocalizationLogger
from sdzero_pl.core.losses import naive_topk_divergence
from sdzero_pl.core.optim import OptimArgs
from sdzero_pl.core.sequences import build_distill_example, collate_distill, position_ids
from sdzero_pl.data.questions import QuestionSource
from sdzero_pl.evaluation.evaluate import EvalDataModule
from sdzero_pl.evaluation.localization import (
    Response, ResponseView, Scored, bucket_report, render_html, render_tensorboard_text
)
from sdzero_pl.evaluation.metrics import bucket_means, clamp_roundoff
from sdzero_pl.evaluation.plots import bucket_figure
from sdzero_pl.phase2.distill import SelfDistillModule
from sdzero_pl.phase2.onpolicy import OnPolicyDataModule
from sdzero_pl.rollout import HFRollout
from sdzero_pl.tasks import MathReward


# ------------------------------------------------------------------------------------------ pure pieces
def test_html_rendering_escapes_model_and_dataset_text():
    tokens = ["<script>", "alert('x')", "</script>", " & ", "\n", "<b>"]
    view = ResponseView("q <1>", "What is <i>1+1</i>?", "<2>", 0.0, tokens, [0.1, 0.2, 0.3, 0.0, 0.0, 1.0])
    page = render_html([view], vmax=0.5, title="t<i>", num_rendered=1)
    assert "<script>" not in page and "</script>" not in page and "<b>" not in page and "<i>1" not in page
    assert "&lt;script&gt;" in page and "alert(&#x27;x&#x27;)" in page and " &amp; " in page
    assert "q &lt;1&gt;" in page and "<title>t&lt;i&gt;</title>" in page and "&lt;2&gt;" in page
    assert "rgba(220,38,38,1.000)" in page  # 1.0 / 0.5 clipped at full intensity
    text = render_tensorboard_text([("h", tokens, [0.9, 0.5, 0.0, 0.0, 0.0, 0.0])], strong=0.8, emphasis=0.4)
    assert "<strong>&lt;script&gt;</strong>" in text and "<em>alert(&#x27;x&#x27;)</em>" in text
    assert "<script>" not in text and "<br>" in text


def test_the_page_opens_with_an_index_ranked_by_the_largest_divergence_linking_to_each_response():
    slip = ResponseView("q7", "Tom has 7 apples and gives 5 away. How many are left?", "2", 0.0,
                        ["7", "-", "5", "=", "3", ".", " \\boxed{3}"], [0.02, 0.01, 0.03, 0.01, 0.33, 0.05, 0.2])
    right = ResponseView("q2", "What is 1+1?", "2", 1.0, ["1", "+", "1", "=", "2"], [0.01, 0.0, 0.02, 0.0, 0.04])
    flat = ResponseView("q9", "What is 2+2?", "4", 1.0, ["4"], [0.001])
    page = render_html([right, flat, slip], vmax=0.3, title="step 8", num_rendered=2)
    index, _, body = page.partition("</table>")
    rows = [row for row in index.split("<tr>")[2:]]
    assert [r.split("</td>")[1] for r in rows] == ["<td><a href='#r1'>q7</a>", "<td><a href='#r2'>q2</a>",
                                                          "<td>q9"]
    assert "<td>0.33</td>" in rows[0] and "7-5=<mark>3</mark>. \\boxed{3}" in rows[0]  # the wrong '3', in context
    assert "<h3 id='r1'>#1: question q7, r=0</h3>" in body and "<h3 id='r2'>" in body and "q9" not in body
    for shown in ("Tom has 7 apples and gives 5 away. How many are left?", "<dt>reference answer</dt><dd>2</dd>",
                  "0 (wrong)", "0.33 on token 5 of 7"):
        assert shown in body, shown
    assert slip.peak() == (4, 0.33) and ResponseView("e", "", "", 0.0, [], []).peak() == (-1, 0.0)


def test_float_roundoff_below_zero_is_clamped_and_real_corruption_raises():
    values = clamp_roundoff(torch.tensor([0.2, -5e-7, 0.0, -9e-5]), tolerance=1e-4)
    assert values.tolist() == pytest.approx([0.2, 0.0, 0.0, 0.0]) and (values >= 0).all()
    with pytest.raises(ValueError, match=r"1 of 3 D_t values are not finite or below -0.0001 \(e.g. -0.01\)"):
        clamp_roundoff(torch.tensor([0.2, -0.01, 0.1]), tolerance=1e-4)
    with pytest.raises(ValueError, match="corrupted"):
        clamp_roundoff(torch.tensor([0.2, float("nan")]), tolerance=1e-4)


def test_bucket_means_show_the_absolute_level_and_the_figure_draws_them_on_a_log_scale():
    wrong = [1.0] + [0.01] * 19  # the same shares for both classes ...
    right = [0.01] + [0.0001] * 19  # ... at a level 100 times lower
    scored = [_scored(0.0, wrong), _scored(1.0, right)]
    report = bucket_report(scored, num_buckets=2, per_response=False)
    assert report["r0"]["shares"] == pytest.approx(report["r1"]["shares"])
    assert report["r0"]["means"] == pytest.approx([(1.0 + 9 * 0.01) / 10, 0.01])
    assert report["r1"]["means"] == pytest.approx([(0.01 + 9 * 0.0001) / 10, 0.0001])
    assert bucket_means([3.0, 1.0], 3) == [3.0, 1.0, None]
    figure = bucket_figure({k: v["shares"] for k, v in report.items()}, "t", {k: v["means"] for k, v in report.items()})
    shares_axis, means_axis = figure.axes
    assert means_axis.get_yscale() == "log"
    assert len(means_axis.lines) == 2 and shares_axis.get_yscale() == "linear"


def _scored(reward: float, divergence: list[float]) -> Scored:
    response = Response("q", [1], [2] * len(divergence), reward)
    return Scored(response, [2] * len(divergence), divergence, [-d for d in divergence])


def test_bucket_report_separates_rewards_and_shares_sum_to_one():
    scored = [_scored(0.0, [4.0, 3.0]), _scored(0.0, [2.0, 1.0]), _scored(1.0, [1.0, 1.0, 1.0, 1.0])]
    report = bucket_report(scored, num_buckets=2, per_response=False)
    assert report["r0"]["shares"] == pytest.approx([0.7, 0.3])  # pooled: 4+3 of 10
    assert report["r1"]["shares"] == pytest.approx([0.5, 0.5])
    assert report["r0"]["responses"] == 2 and report["r0"]["tokens"] == 4
    assert report["r0"]["mean_divergence"] == pytest.approx(2.5)
    assert report["r0"]["mean_token_reward"] == pytest.approx(-2.5)
    per_response = bucket_report(scored, num_buckets=2, per_response=True)
    assert per_response["r0"]["shares"] == pytest.approx([(4 / 7 + 2 / 3) / 2, (3 / 7 + 1 / 3) / 2])
    only_wrong = bucket_report(scored[:1], num_buckets=2, per_response=False)
    assert only_wrong["r1"]["shares"] is None and only_wrong["r1"]["responses"] == 0


def test_scores_match_a_naive_full_vocab_reference(tiny_model_dir):
    module = SelfDistillModule(tiny_model_dir, dtype="float64", top_k=8, divergence="mixed", chunk_size=5)
    module.configure_model()
    with torch.no_grad():  # make the teacher differ from the student
        for param in module.teacher.parameters():
            param.add_(0.05 * torch.randn_like(param))
    responses = [Response("a", [1, 5, 6, 7], [10, 11, 12, 2], 0.0), Response("b", [1, 5], [20, 21, 22, 23, 24], 1.0)]
    controls = {0.0: [30, 31], 1.0: [32]}
    examples = [build_distill_example(r.prompt_ids, r.completion_ids, controls[r.reward], [2], 64) for r in responses]
    batch = collate_distill(examples, pad_id=0)
    scored = SelfLocalizationLogger._score_batch(module, batch, responses, 1e-4)

    def full_logits(model, role):
        mask = batch[f"{role}_attention_mask"]
        logits = model(input_ids=batch[f"{role}_ids"], attention_mask=mask, position_ids=position_ids(mask)).logits
        return logits[:, :-1][batch[f"{role}_mask"][:, 1:].bool()]  # (N, V): positions that score y

    with torch.no_grad():
        student, teacher = full_logits(module.policy, "student"), full_logits(module.teacher, "teacher")
    targets = torch.tensor([t for r in responses for t in r.completion_ids])
    divergence = naive_topk_divergence(student, teacher, k=8, divergence="mixed")["loss"]
    token_reward = (student.log_softmax(-1) - teacher.log_softmax(-1)).gather(-1, targets[:, None]).squeeze(-1)
    assert [s.target_ids for s in scored] == [r.completion_ids for r in responses]
    got_divergence = torch.tensor([d for s in scored for d in s.divergence], dtype=torch.float64)
    got_reward = torch.tensor([t for s in scored for t in s.token_reward], dtype=torch.float64)
    assert torch.allclose(got_divergence, divergence, rtol=1e-4, atol=1e-9)
    assert torch.allclose(got_reward, token_reward, rtol=1e-4, atol=1e-9)
    assert got_divergence.abs().sum() > 0


def test_logger_validates_its_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        SelfLocalizationLogger(every_n_steps=0)


# ------------------------------------------------------------------------------------------ tiny run
class Probe(L.Callback):
    """Records the RNG state and module modes at each hook it sees (placed before and after the logger)."""

    def __init__(self) -> None:
        self.seen = []

    def _record(self, pl_module) -> None:
        self.seen.append((torch.get_rng_state().clone(), pl_module.policy.training, pl_module.teacher.training))

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._record(pl_module)


@pytest.fixture(scope="module")
def reward():
    verifier = MathReward()  # one worker pool for both runs
    yield verifier
    verifier.close()


def _fit(model_dir: str, questions: str, root, reward: MathReward,
         callbacks: list) -> tuple[SelfDistillModule, L.Trainer]:
    L.seed_everything(0)
    module = SelfDistillModule(model_dir, dtype="float32", top_k=8, optim=OptimArgs(lr=1e-2, warmup_steps=1))
    data = OnPolicyDataModule(
        QuestionSource(questions, id_field="id", instruction=" Answer in \\boxed{}.", shuffle=True),
        prompts_per_epoch=4, batch_size=2,
        max_teacher_len=256, reward=reward, seed=0,
        rollout=HFRollout(temperature=1.0, max_new_tokens=8, batch_size=8, show_progress=False),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
        logger=TensorBoardLogger(str(root), name="tb"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, callbacks=callbacks, default_root_dir=str(root),
    )
    trainer.fit(module, datamodule=data)
    return module, trainer


def test_analysis_callbacks_run_on_the_tiny_model_without_changing_weights(tiny_model_dir, questions_file, tmp_path, reward):
    plain, _ = _fit(tiny_model_dir, questions_file, tmp_path / "plain", reward, [])
    before, after = Probe(), Probe()
    logger = SelfLocalizationLogger(num_responses=4, every_n_steps=2, num_rendered=2, batch_size=3)
    evaluation = BenchmarkEval(EvalDataModule([questions_file], max_questions=3, batch_size=3), num_samples=2,
                               rollout=HFRollout(temperature=0.7, max_new_tokens=6, show_progress=False),
                               reward=reward)  # after epoch 0: epoch 1 trains after it ran
    logged, trainer = _fit(tiny_model_dir, questions_file, tmp_path / "logged", reward,
                           [before, logger, after, RolloutBehaviourLogger(), evaluation])

    initial = SelfDistillModule(tiny_model_dir, dtype="float32")
    initial.configure_model()
    changed = False
    for (name, p_plain), p_logged, p_init in zip(plain.policy.state_dict().items(),
                                                 logged.policy.state_dict().values(),
                                                 initial.policy.state_dict().values()):
        assert torch.equal(p_plain, p_logged), f"{name} differs with the logger"
        changed |= not torch.equal(p_plain, p_init)
    assert changed, "training did not change the student: the comparison proves nothing"
    for p_teacher, p_init in zip(logged.teacher.parameters(), initial.policy.parameters()):
        assert torch.equal(p_teacher, p_init)
    assert len(before.seen) == len(after.seen) == 5  # train start + 4 optimizer steps
    for (rng_a, *modes_a), (rng_b, *modes_b) in zip(before.seen, after.seen):
        assert torch.equal(rng_a, rng_b), "the logger consumed the global RNG"
        assert modes_a == modes_b == [True, False]
    for name in ("behaviour/len_tokens_mean", "eval/questions/avg@2", "eval/average/pass@2",
                 "eval/behaviour/phrase/wait_per_response"):
        assert name in trainer.callback_metrics, name
    assert (tmp_path / "logged" / "tb" / "version_0" / "eval_step2.md").is_file()

    root = tmp_path / "logged" / "tb" / "version_0" / "self_localization"
    assert sorted(p.name for p in root.iterdir()) == ["step_0", "step_2", "step_4"]
    data = json.loads((root / "step_4" / "data.json").read_text())
    assert len(data["responses"]) == 4 and data["num_buckets"] == 20
    for row in data["responses"]:
        assert len(row["divergence"]) == len(row["token_reward"]) == len(row["token_ids"]) > 0
        assert min(row["divergence"]) >= 0.0
    for key in ("r0", "r1"):
        if data["buckets"][key]["shares"] is not None:
            assert sum(data["buckets"][key]["shares"]) == pytest.approx(1.0)
    page = (root / "step_4" / "responses.html").read_text()
    assert page.count("<h3 id=") == 2 and page.count("<tr><td>") == 4  # 2 rendered, all 4 in the index
    assert "<dt>reference answer</dt>" in page and "What is" in page
    assert (root / "step_4" / "buckets.png").read_bytes()[:4] == b"\x89PNG"
    _check_tensorboard(tmp_path / "logged" / "tb" / "version_0")


def _check_tensorboard(log_dir) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "self_localization/buckets" in tags["images"]
    assert any(t.startswith("self_localization/divergence_r") for t in tags["histograms"])
    assert any(t.startswith("self_localization/bucket_shares_r") for t in tags["histograms"])
    assert any(t.startswith("self_localization/responses") for t in tags["tensors"])
    assert any(t.startswith("self_localization/mean_divergence_r") for t in tags["scalars"])
