"""Lightning callbacks of sdzero-pl. None of them changes the trained weights unless that is its job
(TeacherSync changes the teacher; it never touches the student)."""

from callbacks.teacher_sync import TeacherSync

__all__ = ["TeacherSync"]

from callbacks.behaviour import RolloutBehaviourLogger  # noqa: E402
from callbacks.self_localization import SelfLocalizationLogger  # noqa: E402
from sdzero_pl.evaluate import BenchmarkEval  # noqa: E402  (defined next to the evaluation it runs)

__all__ += ["RolloutBehaviourLogger", "SelfLocalizationLogger", "BenchmarkEval"]

from callbacks.vllm_refresh import VLLMWeightRefresh  # noqa: E402

__all__ += ["VLLMWeightRefresh"]
