"""The tiny base model's held-out record: measured by the project's evaluator, written into its TRAINING.md.

Used by ``scripts/train_tiny_base.py`` (after training, and ``--measure DIR`` to measure a saved model again).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from sdzero_pl.core.models import load_model, load_tokenizer
from sdzero_pl.core.prompts import control_phrases
from sdzero_pl.data.questions import Question
from sdzero_pl.evaluation.evaluate import evaluate_questions
from sdzero_pl.rollout import HFRollout
from sdzero_pl.tasks import MathReward, extract_last_boxed
from sdzero_pl.tasks.arithmetic import Problem, generate_split, settings_from_args


def measure(model, tokenizer, problems: list[Problem], args, reward: MathReward, *, samples: int = 1,
            temperature: float | None = None, seed: int = 0, revise: bool = False) -> dict:
    """Accuracy and behaviour of ``model`` on ``problems`` through the project's evaluator
    (:func:`sdzero_pl.evaluation.evaluate.evaluate_questions`: HF generate, the math reward, avg@k / pass@k and, with
    ``revise``, generate-then-revise with the paper's control phrases), summed up for this script's records."""
    temperature = args.temperature if temperature is None else temperature
    rollout = HFRollout(temperature=temperature, max_new_tokens=args.max_new_tokens, batch_size=64, show_progress=False)
    questions = [Question(p.id, p.problem, p.answer) for p in problems]
    row, records = evaluate_questions(model, tokenizer, questions, rollout=rollout, reward=reward, num_samples=samples,
                                      phrases=control_phrases("paper") if revise else None, batch_size=64, seed=seed)
    first = [r for r in records if r.sample == 0]
    result = {
        "accuracy": row[f"avg@{samples}"], f"pass@{samples}": row[f"pass@{samples}"],
        "accuracy_per_sample": [sum((r.reward or 0.0) for r in records if r.sample == i) / len(first)
                                for i in range(samples)],
        "boxed_rate": sum(extract_last_boxed(r.completion) is not None for r in records) / len(records),
        "ended_rate": 1.0 - row["truncated_frac"], "mean_completion_len": row["len_mean"], "n": len(first),
        "samples": [(r.reward, r.completion) for r in first],
    }
    if revise:
        result.update(revised_accuracy=row["revised_acc"], wrong_to_right=row["correction_rate"],
                      right_to_right=1.0 - row["regression_rate"],
                      revision_boxed_rate=sum(extract_last_boxed(r.revision) is not None for r in records) / len(records))
    return result


def measure_heldout(model, tokenizer, args, reward: MathReward) -> dict:
    """The held-out record of TRAINING.md: k samples with generate-then-revise, and greedy decoding."""
    heldout = generate_split("heldout", args.heldout_n, 0, settings_from_args(args), prefix=args.prefix)
    k = args.heldout_samples
    return {"sampled": measure(model, tokenizer, heldout, args, reward, samples=k, seed=args.seed, revise=True),
            "greedy": measure(model, tokenizer, heldout, args, reward, temperature=0.0)}


def write_samples(directory: Path, sampled: dict) -> None:
    lines = [f"{r or 0.0:.0f}\t{c!r}" for r, c in sampled["samples"][:30]]
    (directory / "heldout_samples.tsv").write_text("reward\tcompletion\n" + "\n".join(lines) + "\n")


def log_heldout(chosen: str, heldout: dict, args: argparse.Namespace) -> None:
    sampled, k = heldout["sampled"], args.heldout_samples
    log(f"{chosen}: held-out avg@{k} {sampled['accuracy']:.3f} (greedy {heldout['greedy']['accuracy']:.3f}); "
        f"revisions {sampled['revised_accuracy']:.3f}, wrong->right {sampled['wrong_to_right']:.3f}")


def accuracy_section(args: argparse.Namespace, sampled: dict, greedy: dict) -> str:
    """TRAINING.md's held-out record, measured by the project's evaluator (also rewritten by ``--measure``)."""
    k = args.heldout_samples
    per_sample = ", ".join(f"{a:.3f}" for a in sampled["accuracy_per_sample"])
    return f"""## Accuracy

Held-out: the first {sampled['n']} problems of the `heldout` split (seed 0), {k} samples per question at
temperature {args.temperature} (plain sampling, no top-k/top-p; at most {args.max_new_tokens} new tokens), measured by
the project's evaluator (`sdzero_pl.evaluation.evaluate_questions`: the same sampling, math reward and metrics as
`python main.py validate`; HF generate, 64 questions per batch, sampling seed {args.seed}):

- **accuracy {sampled['accuracy']:.3f}** (avg@{k}; per sample {per_sample}); pass@{k} {sampled[f'pass@{k}']:.3f};
  greedy decoding {greedy['accuracy']:.3f}
- completions with a boxed answer {sampled['boxed_rate']:.3f}, that ended their turn (`<|im_end|>`)
  {sampled['ended_rate']:.3f}; mean length {sampled['mean_completion_len']:.1f} tokens

Generate-then-revise with the paper's control phrases (one revision per sample, context
`chat(x) + init + "\\n\\n" + control + "\\n\\n"`, same sampling): revision accuracy
{sampled['revised_accuracy']:.3f}, wrong -> right {sampled['wrong_to_right']:.3f}, right -> right
{sampled['right_to_right']:.3f}, boxed {sampled['revision_boxed_rate']:.3f}.

Reproduce (measures a saved model again and rewrites this section): `python scripts/train_tiny_base.py --measure
{args.out}` (add the task flags of the command above if they differ from the defaults). A few held-out samples
(first sample of each question) are in `heldout_samples.tsv`.

"""


def training_md(args: argparse.Namespace, r: dict) -> str:
    command = "OMP_NUM_THREADS=1 python " + " ".join(sys.argv)
    rows = "\n".join(
        f"| {h['step']} | {h['wall_min']:.1f} | {h['cpu_min']:.1f} | {h['loss']:.4f} | {h['accuracy']:.3f} "
        f"| {h['boxed_rate']:.2f} | {h['ended_rate']:.2f} | {h['mean_completion_len']:.1f} |"
        for h in r["history"]
    )
    retry_text = {
        "feedback": f"attempt, feedback that says whether it is right, solution; {args.retry_slip_prob:.0%} of the "
                    "attempts wrong: an arithmetic slip, a misread operand or a flipped operation",
        "neutral": f"attempt, neutral interjection, solution; {args.retry_slip_prob:.0%} of the attempts with an "
                   "arithmetic slip",
        "localized": f"attempt, feedback that says whether it is right, solution; until step {args.own_errors_from} "
                     + (f"and a validation accuracy of at least {args.own_errors_min_accuracy}, "
                        if getattr(args, "own_errors_min_accuracy", 0) > 0 else "")
                     + "the feedback style's synthetic attempts, then the model's OWN answers to "
                     f"{args.own_errors_pool} fresh training problems (temperature {args.own_errors_temperature}), "
                     f"rebuilt every {args.own_errors_every} steps and balanced to {args.retry_slip_prob:.0%} wrong; "
                     "the target, the canonical solution, repeats a wrong attempt's correct steps and fixes its "
                     "first wrong one",
    }[args.retry_style]
    title = {"arith": "tiny-arith: the embedded demo's base model",
             "chain": "tiny-chain: the base model of the demo's chain variant"}[args.task]
    module = {"arith": "sdzero_pl.tasks.arithmetic", "chain": "sdzero_pl.tasks.chain"}[args.task]
    return f"""# {title}

Trained from scratch by `scripts/train_tiny_base.py` (seeded, one CPU thread). There is no resume: rerun the
command to reproduce it (Ctrl-C during a run leaves this directory untouched).

## Command

```
{command}
```

## Model

Qwen3ForCausalLM trained from random init: hidden {args.hidden_size}, {args.num_hidden_layers} layers,
{args.num_attention_heads} heads x head_dim {args.head_dim} ({args.num_key_value_heads} KV heads), MLP
{args.intermediate_size}, tied embeddings, float32, {r['n_params']:,} parameters, {r['size_mb']:.1f} MB on disk.
Tokenizer: `sdzero_pl.core.tiny.build_char_tokenizer()` (one token per character, ChatML, eos `<|im_end|>`).

## Task (`{module}`)

`{r['settings']}`

Training data: the first {args.n_train} problems of the `train` split (seed {args.seed}), chat-formatted, loss on
the assistant turn only (worked solution + `<|im_end|>`); {args.retry_fraction:.0%} of the batches are retry
examples ({retry_text}; loss on the final solution only; see the script's docstring). {args.steps} planned steps of batch
{args.batch_size}; AdamW lr {args.lr}, {args.warmup_steps} warm-up steps, cosine to {args.min_lr_ratio} x lr,
weight decay {args.weight_decay}, betas (0.9, 0.95), grad clip {args.grad_clip}.

{accuracy_section(args, r['sampled'], r['greedy'])}{own_errors_section(r.get('own_errors', []))}## Model selection

Saved checkpoint: {r['chosen']}.
Validation during training ({args.eval_n} train-split questions of another seed, none of them trained on; one
sample each, same sampling as above):

| step | wall min | cpu min | answer loss (EMA) | val accuracy | boxed | ended | mean len |
|---|---|---|---|---|---|---|---|
{rows}

## Time

Training {r['train_wall']:.1f} min wall-clock ({r['train_cpu']:.1f} min of CPU time on 1 thread); with the final
held-out evaluation and saving {r['total_wall']:.1f} min wall-clock ({r['total_cpu']:.1f} min CPU). The machine
was shared with other jobs, so wall-clock overstates the cost on an idle core.
"""


def own_errors_section(refreshes: list[dict]) -> str:
    """The localized style's record: each rebuild of the retry examples from the model's own answers."""
    if not refreshes:
        return ""
    rows = "\n".join(f"| {r['step']} | {r['pool']} | {r['wrong_share_sampled']:.3f} | {r['wrong']} | {r['right']} | "
                     f"{r['restated']} | "
                     f"{', '.join(f'{k}: {v}' for k, v in r['first_wrong_step'].items())} |" for r in refreshes)
    return f"""## Own-error retry examples

Each rebuild: the model's answers to a fresh pool of training problems, the share of them wrong, the wrong and right
attempts kept (balanced; restated: canonical solutions standing in for right answers the model did not give), and where the kept wrong attempts first go wrong (index of the first wrong equation;
the index after the last equation means the box or the end is wrong).

| step | pool | wrong (sampled) | wrong kept | right kept | restated | first wrong step: count |
|---|---|---|---|---|---|---|
{rows}

"""


def remeasure(args: argparse.Namespace) -> None:
    """``--measure DIR``: measure a saved model on the held-out split again and rewrite the Accuracy section of its
    TRAINING.md (the training record around it is kept) and its heldout_samples.tsv, atomically."""
    directory = Path(args.measure)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(str(directory), "float32"), load_tokenizer(str(directory))
    reward = MathReward()
    try:
        heldout = measure_heldout(model, tokenizer, args, reward)
    finally:
        reward.close()
    log_heldout(f"{directory}", heldout, args)
    record = directory / "TRAINING.md"
    text = record.read_text()
    start, end = text.index("## Accuracy\n"), text.index("## Model selection\n")
    args.out = str(directory)
    new = text[:start] + accuracy_section(args, heldout["sampled"], heldout["greedy"]) + text[end:]
    write_samples(directory, heldout["sampled"])
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, record)
    log(f"rewrote the Accuracy section of {record}")


def log(message: str) -> None:
    print(f"[train_tiny_base] {message}", flush=True)
