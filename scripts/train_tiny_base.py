"""Train the embedded demo's base model from scratch: a tiny Qwen3 on the arithmetic word-problem task.

Not part of the paper: the paper starts from Qwen3-4B-Instruct / Olmo-3-7B-Instruct. The demo needs a base model
that answers in the chat format, always boxes an answer and ends its turn, yet is deliberately IMPERFECT
(30-60 % held-out accuracy at temperature 0.7) so that SD-Zero has room to improve it on a CPU in minutes.

Plain PyTorch: AdamW, linear warm-up then cosine decay, one CPU thread by default. Two kinds of batches:
- answer examples: chat(x) -> worked solution + ``<|im_end|>``, loss on the assistant turn only;
- retry examples (``--retry_fraction`` of the batches; deviation, see below): chat(x) -> attempt + "\\n\\n" +
  interjection + "\\n\\n" + worked solution + ``<|im_end|>``; loss on the final solution + ``<|im_end|>`` only.
  ``--retry_style feedback`` (default): the attempt is wrong half of the time (an arithmetic slip, a misread
  operand or a flipped operation, the kinds of error the model makes) and the interjection says whether it is
  right ("Hmm, that is not correct. Let me fix it." / "This is correct. Let me restate it.");
  ``--retry_style neutral``: a neutral interjection ("Let me check this again.") and arithmetic slips only;
  ``--retry_style localized`` (``--task chain``'s): the feedback style until ``--own_errors_from``, then the
  attempts are the model's OWN sampled answers, refreshed every ``--own_errors_every`` steps, and the target is the
  canonical solution, which repeats the attempt's correct steps and fixes its first wrong one
  (``scripts/tiny_base_own_errors.py``).
``--task chain`` trains on the harder variant :mod:`sdzero_pl.tasks.chain` (its settings become the task flags'
defaults, and ``checkpoints/tiny-chain`` the output); the default task and ``checkpoints/tiny-arith`` are unchanged.
An instruct LLM can continue its own answer after an interjection such as SD-Zero's control phrases, and it knows
what "this response is not correct" means; a model trained on answer examples alone cannot (it emits garbage
there), which leaves Phase 1 nothing to select from. The feedback retry examples give it that general ability
WITHOUT SD-Zero's control phrases (tests check that none is used): tying "rephrase" / "not correct, let me start
over" to the reward is still Phase 1's job. SD-Zero needs a reviser that is better than the generator; with the
neutral style the tiny model's reviser was worse and SD-Zero could not improve it (docs/demo_task.md).

The accuracy is checked every ``--eval_every`` steps on validation questions (train split, another seed, minus
the training questions). The checkpoint kept is the in-band evaluation (``[--band_low, --band_high]``) closest to
``--target`` (the final model, with a warning, if none was in band; with ``--select_after_rebuilds N`` only evaluations
after N own-error rebuilds count); ``--stop_above_band`` ends training once the
band is passed. The kept model is then measured on the held-out split (sampled and greedy, plus a
generate-then-revise check with the paper's control phrases) and everything is recorded in ``TRAINING.md``.

No resuming: a run takes minutes. Ctrl-C at any time leaves the output directory untouched (it is written to a
temporary directory and renamed at the very end); rerun the same command to reproduce it.

    OMP_NUM_THREADS=1 python scripts/train_tiny_base.py --out checkpoints/tiny-arith
    OMP_NUM_THREADS=1 python scripts/train_tiny_base.py --task chain --retry_style localized
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Qwen3ForCausalLM

from sdzero_pl.core.prompts import render_prompt
from sdzero_pl.core.tiny import build_char_tokenizer, tiny_qwen3_config
from sdzero_pl.tasks import MathReward
from sdzero_pl.tasks.arithmetic import (
    Problem, TaskSettings, add_settings_arguments, feedback_retry_example, generate_split, iter_problems, retry_example,
    settings_from_args
)
from sdzero_pl.tasks.chain import CHAIN
from sdzero_pl.tasks.chain import PREFIX as CHAIN_PREFIX

from tiny_base_own_errors import OwnErrors  # isort: skip  (this folder is on sys.path when the script runs)
from tiny_base_record import (  # isort: skip
    log, log_heldout, measure, measure_heldout, remeasure, training_md, write_samples
)

IGNORE = -100
TASKS = {"arith": ("arith", TaskSettings()), "chain": (CHAIN_PREFIX, CHAIN)}  # --task: (id prefix, settings)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--task", choices=tuple(TASKS), default="arith",
                   help="arith: the default demo task; chain: the harder variant (sdzero_pl.tasks.chain), whose "
                        "settings become the task flags' defaults and checkpoints/tiny-chain the default --out")
    p.add_argument("--out", default=None, help="output HF directory (default checkpoints/tiny-<task>)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model init, the batches and the task's train split")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--measure", default=None, metavar="DIR",
                   help="do not train: measure the saved model in DIR on the held-out split and rewrite the Accuracy "
                        "section of its TRAINING.md")
    g = p.add_argument_group("model (head_dim must stay 32 or 64 for vLLM's CPU backend)")
    g.add_argument("--hidden_size", type=int, default=192)
    g.add_argument("--num_hidden_layers", type=int, default=4)
    g.add_argument("--num_attention_heads", type=int, default=6)
    g.add_argument("--num_key_value_heads", type=int, default=2)
    g.add_argument("--head_dim", type=int, default=32, choices=(32, 64))
    g.add_argument("--intermediate_size", type=int, default=512)
    g = p.add_argument_group("optimisation")
    g.add_argument("--n_train", type=int, default=40_000, help="training problems (train split)")
    g.add_argument(
        "--retry_fraction", type=float, default=0.5,
        help="share of batches made of retry examples (attempt, interjection, solution; see module doc)",
    )  # fmt: skip
    g.add_argument("--retry_slip_prob", type=float, default=0.5,
                   help="share of retry first attempts that are wrong (neutral style: an arithmetic slip)")
    g.add_argument(
        "--retry_style", choices=("neutral", "feedback", "localized"), default="feedback",
        help="neutral: the interjection says nothing about the attempt; feedback: it says whether the attempt was "
             "right, and wrong attempts carry slips, misread operands or flipped operations; localized: feedback, "
             "then the model's own answers as the attempts (see module doc)",
    )
    g.add_argument("--own_errors_from", type=int, default=300,
                   help="localized: first step whose retry examples are built from the model's own answers")
    g.add_argument("--own_errors_min_accuracy", type=float, default=0.0,
                   help="localized: start the rebuilds only once the latest validation accuracy reaches this (so the "
                        "model's wrong answers are mostly one wrong step in a right chain, not wrong from the start)")
    g.add_argument("--own_errors_every", type=int, default=100, help="localized: steps between rebuilds")
    g.add_argument("--own_errors_pool", type=int, default=1024, help="localized: training problems answered per rebuild")
    g.add_argument("--own_errors_temperature", type=float, default=1.0,
                   help="localized: sampling temperature of the own answers (Phase 2 samples at 1.0)")
    g.add_argument("--steps", type=int, default=1200, help="optimizer steps of the cosine schedule")
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    g.add_argument("--warmup_steps", type=int, default=50)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--grad_clip", type=float, default=1.0)
    g = p.add_argument_group("evaluation and stopping")
    g.add_argument("--eval_every", type=int, default=50)
    g.add_argument("--eval_n", type=int, default=200, help="validation questions per periodic check")
    g.add_argument("--heldout_n", type=int, default=200, help="held-out questions for the final measurement")
    g.add_argument("--heldout_samples", type=int, default=4, help="samples per held-out question (avg@k, pass@k)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--max_new_tokens", type=int, default=96)
    g.add_argument("--band_low", type=float, default=0.30)
    g.add_argument("--band_high", type=float, default=0.60)
    g.add_argument("--target", type=float, default=0.45, help="keep the in-band evaluation closest to this accuracy")
    g.add_argument(
        "--stop_above_band", action=argparse.BooleanOptionalAction, default=True,
        help="stop once validation accuracy > --band_high",
    )  # fmt: skip
    g.add_argument("--select_after_rebuilds", type=int, default=0,
                   help="localized: an evaluation counts for the band (keeping, stopping above it) only after this "
                        "many own-error rebuilds, so the kept model has trained on its own errors")
    g.add_argument("--max_minutes", type=float, default=25.0, help="stop training after this wall-clock time")
    add_settings_arguments(p.add_argument_group("task difficulty (defaults: --task's settings)"))
    task = p.parse_known_args(argv)[0].task
    p.set_defaults(**asdict(TASKS[task][1]))
    args = p.parse_args(argv)
    args.out = args.out or f"checkpoints/tiny-{task}"
    args.prefix = TASKS[task][0]
    if not 0 <= args.retry_fraction < 1:
        p.error(f"--retry_fraction must be in [0, 1), got {args.retry_fraction}")
    if not args.band_low <= args.target <= args.band_high:
        p.error(f"--target ({args.target}) must lie in [--band_low, --band_high]")
    if args.hidden_size != args.num_attention_heads * args.head_dim:
        p.error(f"--hidden_size ({args.hidden_size}) must equal --num_attention_heads x --head_dim")
    if args.retry_style == "localized" and (args.own_errors_every < 1 or args.own_errors_pool < 2):
        p.error(f"--own_errors_every must be >= 1 and --own_errors_pool >= 2, got {args.own_errors_every}, "
                f"{args.own_errors_pool}")
    return args


def encode(tokenizer, problems: list[Problem]) -> list[tuple[list[int], int]]:
    """(token ids of chat(x) + solution + <|im_end|>, number of prompt tokens) per problem."""
    prompts = [render_prompt(tokenizer, p.problem) for p in problems]
    prompt_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    target_ids = tokenizer([p.solution for p in problems], add_special_tokens=False).input_ids
    return [(x + y + [tokenizer.eos_token_id], len(x)) for x, y in zip(prompt_ids, target_ids)]


def encode_retry(tokenizer, problems: list[Problem], seed: int, slip_prob: float,
                 style: str = "neutral") -> list[tuple[list[int], int]]:
    """chat(x) + attempt + "\\n\\n" + interjection + "\\n\\n" + solution + <|im_end|>; the loss starts after the
    interjection, so the model never learns to make the slips, only to solve the problem again after one.
    (``localized`` starts from the feedback style's synthetic attempts, see :func:`encode_examples`.)"""
    rng = random.Random(seed)
    make = retry_example if style == "neutral" else feedback_retry_example
    return encode_examples(tokenizer, [(p, make(p, rng, slip_prob)) for p in problems])


def encode_examples(tokenizer, examples: list[tuple[Problem, tuple[str, str, str]]]) -> list[tuple[list[int], int]]:
    """Token ids of (problem, (attempt, interjection, target)) retry examples and their context lengths."""
    contexts, targets = [], []
    for p, (first, phrase, second) in examples:
        contexts.append(render_prompt(tokenizer, p.problem) + first + "\n\n" + phrase + "\n\n")
        targets.append(second)
    context_ids = tokenizer(contexts, add_special_tokens=False).input_ids
    target_ids = tokenizer(targets, add_special_tokens=False).input_ids
    return [(x + y + [tokenizer.eos_token_id], len(x)) for x, y in zip(context_ids, target_ids)]


def collate(rows: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels cover the assistant turn only (no prompt, no padding)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def validation_problems(train: list[Problem], n: int, seed: int, settings: TaskSettings) -> list[Problem]:
    """Train-split questions from another seed that are not in the training set (model selection data)."""
    seen = {p.problem for p in train}
    out = []
    for p in iter_problems("train", seed + 1_000_003, settings):
        if p.problem not in seen:
            out.append(p)
        if len(out) == n:
            return out
    raise AssertionError("unreachable: iter_problems is endless")


def build_model(args: argparse.Namespace, tokenizer) -> Qwen3ForCausalLM:
    config = tiny_qwen3_config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


class Clock:
    """Wall-clock and CPU minutes since construction (the machine is shared: both are recorded)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.time(), time.process_time()

    def minutes(self) -> tuple[float, float]:
        return (time.time() - self.wall0) / 60, (time.process_time() - self.cpu0) / 60


def train_loop(
    args, model, tokenizer, rows, retry_rows, val_problems, clock: Clock, reward: MathReward,
    own: OwnErrors | None = None,
) -> tuple[list[dict], int, dict | None]:
    """AdamW over shuffled batches with periodic validation; returns (history, last step, kept state or None)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    # Each batch holds one kind of example: retry examples are ~twice as long and would pad the others.
    streams = {
        "answer": Batches(rows, args.batch_size, args.seed),
        "retry": Batches(retry_rows, args.batch_size, args.seed + 1),
    }
    kind_rng = random.Random(args.seed)
    history: list[dict] = []
    kept: dict | None = None  # {"step", "accuracy", "state"} of the in-band evaluation closest to --target
    step, loss_ema, accuracy = 0, None, None  # accuracy: the latest validation accuracy
    model.train()
    while step < args.steps:
        if own is not None and own.due(step, accuracy):  # localized: retry attempts from the model's own answers
            examples = own.examples(model, tokenizer, step)
            if examples:  # none when every answer of the pool was right: the previous examples stay (logged)
                streams["retry"] = Batches(encode_examples(tokenizer, examples), args.batch_size, args.seed + 1 + step)
        kind = "retry" if retry_rows and kind_rng.random() < args.retry_fraction else "answer"
        batch = collate(streams[kind].next(), tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if kind == "answer":
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        out_of_time = clock.minutes()[0] > args.max_minutes
        if step % args.eval_every and step != args.steps and not out_of_time:
            continue
        result = measure(model, tokenizer, val_problems, args, reward, seed=args.seed)
        accuracy = result["accuracy"]
        model.train()
        wall, cpu = clock.minutes()
        history.append({"step": step, "wall_min": wall, "cpu_min": cpu, "loss": loss_ema,
                        **{k: v for k, v in result.items() if k != "samples"}})
        log(
            f"step {step} loss {loss_ema:.4f} val acc {result['accuracy']:.3f} boxed {result['boxed_rate']:.2f} "
            f"ended {result['ended_rate']:.2f} ({wall:.1f} min wall, {cpu:.1f} min cpu)"
        )
        eligible = own is None or len(own.refreshes) >= args.select_after_rebuilds
        in_band = eligible and args.band_low <= result["accuracy"] <= args.band_high
        if in_band and (kept is None or abs(result["accuracy"] - args.target) <= abs(kept["accuracy"] - args.target)):
            kept = {"step": step, "accuracy": result["accuracy"], "state": copy.deepcopy(model.state_dict())}
        if eligible and result["accuracy"] > args.band_high and args.stop_above_band:
            log(f"validation accuracy above {args.band_high}: stopping")
            break
        if out_of_time:
            log(f"--max_minutes {args.max_minutes} reached: stopping")
            break
    return history, step, kept


class Batches:
    """Endless deterministic shuffled batches over ``rows`` (a new permutation each epoch)."""

    def __init__(self, rows: list, batch_size: int, seed: int) -> None:
        self.rows, self.batch_size, self.generator = rows, batch_size, torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> list:
        if len(self.order) < self.batch_size:
            self.order = torch.randperm(len(self.rows), generator=self.generator).tolist()
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return [self.rows[i] for i in batch]


def main(args: argparse.Namespace) -> None:
    clock = Clock()
    torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    tokenizer = build_char_tokenizer()
    train_problems = generate_split("train", args.n_train, args.seed, settings, prefix=args.prefix)
    val_problems = validation_problems(train_problems, args.eval_n, args.seed, settings)
    rows = encode(tokenizer, train_problems)
    retry_rows = (encode_retry(tokenizer, train_problems, args.seed, args.retry_slip_prob, args.retry_style)
                  if args.retry_fraction else [])
    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{n_params / 1e6:.2f}M parameters, {len(rows)} training problems, settings {settings}")

    reward = MathReward()
    own = (OwnErrors(args, train_problems[::-1], reward)  # answered in reverse: the retry examples' first problems
           if args.retry_style == "localized" and args.retry_fraction else None)
    history, last_step, kept = train_loop(args, model, tokenizer, rows, retry_rows, val_problems, clock, reward, own)
    train_wall, train_cpu = clock.minutes()
    band = f"[{args.band_low}, {args.band_high}]"
    if kept is None:
        log(f"WARNING: no evaluation was inside {band}; saving the final model")
        chosen = f"step {last_step}, the final one (WARNING: no validation accuracy was in {band})"
    else:
        model.load_state_dict(kept["state"])
        chosen = f"step {kept['step']}, the in-band evaluation closest to {args.target}"

    heldout = measure_heldout(model, tokenizer, args, reward)
    reward.close()
    log_heldout(chosen, heldout, args)
    record = dict(settings=settings, history=history, chosen=chosen, n_params=n_params, train_wall=train_wall,
                  train_cpu=train_cpu, own_errors=own.refreshes if own else [], **heldout)
    save(model, tokenizer, args, record, clock)


def save(model, tokenizer, args: argparse.Namespace, record: dict, clock: Clock) -> None:
    """Write the HF directory, TRAINING.md and a few held-out samples, atomically (temp dir, then rename)."""
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_samples(tmp, record["sampled"])
    record["size_mb"] = sum(f.stat().st_size for f in tmp.iterdir()) / 1e6
    record["total_wall"], record["total_cpu"] = clock.minutes()
    (tmp / "TRAINING.md").write_text(training_md(args, record))
    for path in tmp.iterdir():  # safetensors writes 0600; a shipped model is readable by everyone (as export_hf's)
        path.chmod(0o644)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"saved {out} ({record['size_mb']:.1f} MB) after {record['total_wall']:.1f} min")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        arguments = parse_args()
        remeasure(arguments) if arguments.measure else main(arguments)
    except KeyboardInterrupt:
        log("interrupted: nothing saved")
        sys.exit(130)
