"""Lightning callbacks of sdzero-pl. None of them changes the trained weights unless that is its job
(TeacherSync changes the teacher; VLLMWeightRefresh changes the rollout engine; neither touches the student)."""

from callbacks.behaviour import RolloutBehaviourLogger
from callbacks.benchmark_eval import BenchmarkEval
from callbacks.self_localization import SelfLocalizationLogger
from callbacks.teacher_sync import TeacherSync
from callbacks.vllm_refresh import VLLMWeightRefresh

__all__ = ["BenchmarkEval", "RolloutBehaviourLogger", "SelfLocalizationLogger", "TeacherSync", "VLLMWeightRefresh"]
