"""HF ``generate`` rollout backend: batched, left-padded, on the trainer's own model (CPU, tests, small GPUs)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sdzero_pl.core.sequences import pad_sequences
from sdzero_pl.rollout.base import Rollout, RolloutBackend, split_at_stop


class HFRollout(RolloutBackend):
    """Samples with ``model.generate`` on the trained policy itself, so its weights are always current."""

    def __init__(
        self,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 1024,
        batch_size: int = 32,
        show_progress: bool = True,
    ) -> None:
        """
        Args:
            temperature: sampling temperature; 0 means greedy decoding.
            top_p: nucleus sampling threshold.
            max_new_tokens: longest completion; longer ones are cut and reported as truncated.
            batch_size: prompts per ``generate`` call.
            show_progress: show a progress bar over generation batches (rank 0 only).
        """
        super().__init__(temperature, top_p, max_new_tokens)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.policy: PreTrainedModel | None = None

    def setup(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int]) -> None:
        self.policy = policy
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = list(stop_ids)

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], seed: int, desc: str = "generate", max_new_tokens: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Rollout]:
        if self.policy is None:
            raise RuntimeError("HFRollout.generate called before setup()")
        policy = self.policy
        device = next(policy.parameters()).device
        was_training = policy.training
        policy.eval()  # no dropout while sampling
        rollouts: list[Rollout] = []
        batches = range(0, len(prompt_ids), self.batch_size)
        rank_zero = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        bar = tqdm(total=len(prompt_ids), desc=desc, unit="prompt", disable=not (self.show_progress and rank_zero))
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # the caller's RNG stream is left untouched
                torch.manual_seed(seed)
                for start in batches:
                    chunk = prompt_ids[start : start + self.batch_size]
                    rollouts.extend(self._generate_batch(policy, chunk, device, max_new_tokens or self.max_new_tokens))
                    bar.update(len(chunk))
                    if on_progress is not None:
                        on_progress(len(chunk))
        finally:
            bar.close()
            policy.train(was_training)
        return rollouts

    def _generate_batch(self, policy, chunk, device, max_new_tokens: int) -> list[Rollout]:
        input_ids = pad_sequences(chunk, self.pad_id, side="left").to(device)  # (B, P)
        attention_mask = pad_sequences([[1] * len(p) for p in chunk], 0, side="left").to(device)  # (B, P)
        sampling = (
            {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
            if self.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        output = policy.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            **sampling,
        )  # (B, P + N)
        tails = output[:, input_ids.shape[1] :].tolist()
        return [split_at_stop(tail, self.stop_ids) for tail in tails]
