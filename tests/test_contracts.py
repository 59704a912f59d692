"""Typed contracts between training modules, data modules and callbacks: checked with clear errors, wired one way."""

import lightning as L
import pytest

from callbacks import RolloutBehaviourLogger, TeacherSync
from sdzero_pl.contracts import PolicyModule, RolloutData, SFTData, connect, require
from sdzero_pl.data.questions import QuestionSource
from sdzero_pl.phase1 import SelfReviseSFTModule, TraceDataModule
from sdzero_pl.phase2 import OnPolicyDataModule, SelfDistillModule


def test_require_names_the_protocol_and_the_missing_members():
    class Half:
        rollout_stats: dict = {}

    with pytest.raises(TypeError, match=r"Thing needs a RolloutData .*got Half; missing: last_completions, "
                                        r"optimizer_steps_per_epoch, connect"):
        require(Half(), RolloutData, "Thing")


def test_every_training_module_is_a_policy_module_and_its_data_module_the_contract_it_reads(tiny_model_dir,
                                                                                         questions_file):
    source = QuestionSource(questions_file, id_field="id")
    assert isinstance(SelfDistillModule(tiny_model_dir, dtype="float32"), PolicyModule)
    assert isinstance(SelfReviseSFTModule(tiny_model_dir, dtype="float32"), PolicyModule)
    assert isinstance(OnPolicyDataModule(source), RolloutData) and not isinstance(OnPolicyDataModule(source), SFTData)
    assert isinstance(TraceDataModule(QuestionSource(questions_file, num_questions=4)), SFTData)


def test_a_module_refuses_a_data_module_of_the_other_phase(tiny_model_dir, questions_file):
    module = SelfDistillModule(tiny_model_dir, dtype="float32")
    data = TraceDataModule(QuestionSource(questions_file, num_questions=4))
    with pytest.raises(TypeError, match="SelfDistillModule needs a RolloutData.*got TraceDataModule"):
        connect(module, data, RolloutData)


def test_connect_hands_the_module_to_the_data_module_one_way(tiny_model_dir, questions_file):
    module = SelfDistillModule(tiny_model_dir, dtype="float32")
    data = OnPolicyDataModule(QuestionSource(questions_file, id_field="id"))
    data.setup("validate")
    assert connect(module, data, RolloutData) is data and data.module is module


def test_callbacks_check_their_contracts_in_setup(tiny_model_dir, questions_file):
    trainer = L.Trainer(accelerator="cpu", logger=False)
    trainer.datamodule = TraceDataModule(QuestionSource(questions_file, num_questions=4))
    with pytest.raises(TypeError, match="RolloutBehaviourLogger needs a RolloutData.*TraceDataModule"):
        RolloutBehaviourLogger().setup(trainer, None, "fit")
    with pytest.raises(TypeError, match="TeacherSync needs a TeacherHolder.*SelfReviseSFTModule"):
        TeacherSync().setup(trainer, SelfReviseSFTModule(tiny_model_dir, dtype="float32"), "fit")
