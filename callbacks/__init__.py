"""Lightning callbacks of sdzero-pl. None of them changes the trained weights unless that is its job
(TeacherSync changes the teacher; VLLMWeightRefresh changes the rollout engine; neither touches the student).
DivergenceGuard lives in ``sdzero_pl.core.guard`` (every training module adds one by default); it is listed here
so that YAML can configure its optional rules as ``callbacks.DivergenceGuard``."""

from callbacks.behaviour import RolloutBehaviourLogger
from callbacks.benchmark_eval import BenchmarkEval
from callbacks.self_localization import SelfLocalizationLogger
from callbacks.teacher_sync import TeacherSync
from callbacks.vllm_refresh import VLLMWeightRefresh
from sdzero_pl.core.guard import DivergenceGuard

__all__ = ["BenchmarkEval", "DivergenceGuard", "RolloutBehaviourLogger", "SelfLocalizationLogger", "TeacherSync",
           "VLLMWeightRefresh"]
