"""The code domain: programs extracted from completions, run on stdin/stdout tests in a sandbox."""

from sdzero_pl.tasks.code.reward import CodeReward, extract_code

__all__ = ["CodeReward", "extract_code"]
