"""One Phase-2-style optimizer step through TRL's trainers, run by perf/bench_vs_trl.py inside its own TRL virtual
environment (torch + transformers + trl only: nothing of this project is imported here).

    <trl-venv>/bin/python perf/trl_worker.py {distillation|sdft} MODEL_DIR INPUTS.pt OUT.json --steps N --threads T

* ``distillation``: ``trl.DistillationTrainer`` (TRL 1.16), its loss path ``compute_loss`` -> ``_compute_loss``: the
  student's and the teacher's backbones on the SAME sequence ``x + y`` (its teacher never sees ``P_r`` or a first
  copy of y), then ``_chunked_divergence_loss``: the FULL-vocabulary generalized JSD (``beta``; 0.5 here), projected
  chunk by chunk so no [B, T, V] tensor is built;
* ``sdft``: ``trl.experimental.sdft.SDFTTrainer``, ``compute_loss``: student logits on ``x + y``, teacher logits on
  the teacher sequence the inputs give (here SD-Zero's ``x + y + P_r + y``), both as full [B, T, V] tensors, then
  its ``topk_logits`` divergence over the STUDENT's top-k (k = 64, alpha 0.5, no tail bucket).

Both: on-policy generation is bypassed (the completions are given), gradient checkpointing off, float32 on CPU,
AdamW from the trainer's own ``create_optimizer``. Timed: forward + backward + optimizer step of one full batch
(no gradient accumulation); peak = growth of the resident set over the timed steps (VmHWM after clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def _pad(rows, value, side):
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "left":
            out[i, width - len(r):] = torch.tensor(r)
        else:
            out[i, :len(r)] = torch.tensor(r)
    return out


def tensors(inputs: dict, pad_id: int) -> dict:
    """TRL's batch layout: prompts left-padded, completions right-padded, the teacher sequence left-padded so that
    it ENDS with the completion (SDFT keeps the last ``len(completion)`` logits)."""
    import torch

    prompts, completions = inputs["prompt_ids"], inputs["completion_ids"]
    batch = {
        "prompt_ids": _pad(prompts, pad_id, "left"), "prompt_mask": _pad([[1] * len(p) for p in prompts], 0, "left"),
        "completion_ids": _pad(completions, pad_id, "right"),
        "completion_mask": _pad([[1] * len(c) for c in completions], 0, "right"),
    }
    width = batch["completion_ids"].shape[1]  # teacher rows: prefix left-padded, then the right-padded completion
    prefix = [t[:len(t) - len(c)] for t, c in zip(inputs["teacher_ids"], completions)]
    batch["teacher_input_ids"] = torch.cat([_pad(prefix, pad_id, "left"), batch["completion_ids"][:, :width]], 1)
    batch["teacher_attention_mask"] = torch.cat([_pad([[1] * len(p) for p in prefix], 0, "left"),
                                                 batch["completion_mask"]], 1)
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    return batch


def build_trainer(kind: str, model_dir: str, out_dir: str, n: int):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"prompt": ["unused"] * n})
    common = dict(output_dir=out_dir, per_device_train_batch_size=n, gradient_accumulation_steps=1,
                  gradient_checkpointing=False, bf16=False, use_cpu=True, report_to=[], logging_steps=1000,
                  learning_rate=1e-6, save_strategy="no", max_completion_length=8)
    if kind == "distillation":
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(beta=0.5, **common)
        trainer = DistillationTrainer(model=model_dir, teacher_model=model_dir, args=args, train_dataset=data,
                                      processing_class=tokenizer)
    else:
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        args = SDFTConfig(distillation_mode="topk_logits", distillation_topk=64, distillation_alpha=0.5, **common)
        trainer = SDFTTrainer(model=model_dir, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which is bypassed here
    return trainer, tokenizer


def step(trainer, batch: dict) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of forward + backward + optimizer step."""
    start, cpu = time.perf_counter(), time.process_time()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    trainer.accelerator.backward(loss)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("distillation", "sdft"))
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch
    import trl

    torch.set_num_threads(args.threads)
    inputs = torch.load(args.inputs)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer, tokenizer = build_trainer(args.kind, args.model, out_dir, len(inputs["prompt_ids"]))
        batch = tensors(inputs, tokenizer.pad_token_id)
        warmup_s = step(trainer, batch)[0]  # creates the AdamW state
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        steps = [step(trainer, batch) for _ in range(args.steps)]
        peak = _status_kib("VmHWM") - base
    with open(args.out, "w") as handle:
        json.dump({"times": [s[0] for s in steps], "cpu_times": [s[1] for s in steps], "warmup_s": warmup_s, "peak_gib": peak / 2**20, "trl": trl.__version__,
                   "torch": torch.__version__, "pid": os.getpid()}, handle)


if __name__ == "__main__":
    main()
