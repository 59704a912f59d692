"""Periodic held-out evaluation during ``fit`` with the project's one evaluator (:mod:`sdzero_pl.evaluation.evaluate`).

Every N epochs it samples the benchmarks' questions from the policy being trained, verifies them and logs
``eval/<benchmark>/...`` (plus response length and self-revision phrase frequencies), and writes
``<log_dir>/eval_step<global_step>.json`` / ``.md``. HF generate forks the RNG and restores train mode, so the
training run is unaffected.
"""

from __future__ import annotations

import math

import lightning as L

from sdzero_pl.contracts import PolicyModule, require
from sdzero_pl.core.prompts import CONTROL_PRESETS, stop_token_ids
from sdzero_pl.evaluation.evaluate import (
    EvalDataModule, Sampler, SampleRecord, _settings, check_sampling, write_results
)
from sdzero_pl.evaluation.metrics import DEFAULT_PHRASES, BenchmarkScores, behaviour_metrics
from sdzero_pl.rollout import HFRollout, RolloutBackend, rollout_seed
from sdzero_pl.tasks import MathReward, Verifier


class BenchmarkEval(L.Callback):
    """Evaluates the policy being trained (``pl_module.policy``, any training module) on benchmarks every N epochs during ``fit`` (logs ``eval/<bench>/...``
    and writes ``<log_dir>/eval_step<global_step>.json`` / ``.md``). It samples with its own rollout backend bound
    to the module's policy; HF generate forks the RNG and restores train mode, so training is unaffected."""

    def __init__(
        self,
        data: EvalDataModule,
        every_n_epochs: int = 1,
        num_samples: int = 8,
        pass_k: list[int] | None = None,
        rollout: RolloutBackend | None = None,
        reward: Verifier | None = None,
        log_behaviour: bool = True,
        seed: int = 0,
    ) -> None:
        """
        Args:
            data: the benchmarks (an EvalDataModule, by ``class_path``).
            every_n_epochs: evaluate after every N training epochs.
            num_samples: completions per question, n.
            pass_k: k values of pass@k, each <= num_samples; default ``[num_samples]``.
            rollout: generation backend for the evaluation; default HF generate, temperature 0.7.
            reward: the verifier; default the math reward.
            log_behaviour: also log length and self-revision phrase frequencies of the sampled completions
                (``eval/behaviour/...``; default phrases plus the paper's control phrases), in either phase.
            seed: seed of the sampling streams.
        """
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be >= 1, got {every_n_epochs}")
        self.pass_k = list(pass_k) if pass_k is not None else [num_samples]
        check_sampling(num_samples, self.pass_k, "BenchmarkEval")
        self.data, self.every_n_epochs, self.num_samples = data, every_n_epochs, num_samples
        self.rollout = rollout or HFRollout(temperature=0.7, max_new_tokens=32768, show_progress=False)
        self.reward = reward or MathReward()
        self.seed, self.log_behaviour = seed, log_behaviour
        self._sampler: Sampler | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require(pl_module, PolicyModule, "callbacks.BenchmarkEval")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: PolicyModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if self._sampler is None:
            policy = pl_module.policy
            stops = stop_token_ids(pl_module.tokenizer, policy.generation_config.eos_token_id)
            self.rollout.setup(policy, pl_module.tokenizer, stops)
            self._sampler = Sampler(self.rollout, self.reward, pl_module.tokenizer, stops, self.num_samples, None, None)
        items, size = self.data.shard(trainer.global_rank, trainer.world_size), self.data.batch_size
        ungraded = [self.data.ungraded.get(name, 0) for name in self.data.benchmark_names]
        scores = BenchmarkScores(self.data.benchmark_names, self.num_samples, self.pass_k, False,
                                 ungraded).to(pl_module.device)
        records: list[SampleRecord] = []
        for index, start in enumerate(range(0, len(items), size)):
            seed = rollout_seed(self.seed, trainer.global_step * 4099 + index, trainer.global_rank)
            batch = self._sampler(items[start : start + size], self.data.system_prompt, seed, seed + 1,
                                  self.data.chat_template_kwargs)
            scores.update(batch)
            records += batch
        results = scores.compute()
        for bench, row in results.items():
            pl_module.log_dict({f"eval/{bench}/{k}": v for k, v in row.items() if not math.isnan(v)},
                               on_step=False, on_epoch=True, batch_size=1)
        if self.log_behaviour and records:
            phrases = list(dict.fromkeys(DEFAULT_PHRASES + [CONTROL_PRESETS["paper"][r] for r in (0, 1)]))
            behaviour = behaviour_metrics([r.completion for r in records], phrases, [r.tokens for r in records],
                                          prefix="eval/behaviour")
            pl_module.log_dict(behaviour, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        log_dir = trainer.log_dir or trainer.default_root_dir  # on every rank: Trainer.log_dir is a broadcast
        if trainer.is_global_zero:
            settings = _settings(self.rollout, self.data, num_samples=self.num_samples, pass_k=self.pass_k,
                                 global_step=trainer.global_step, seed=self.seed)
            write_results(results, log_dir, f"step{trainer.global_step}", settings)
