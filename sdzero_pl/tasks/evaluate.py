"""Quick accuracy check of an HF causal LM on a split of the arithmetic task (HF ``generate``, CPU friendly).

A small stand-in until the project's full eval module: one sample per question, batched with left padding,
scored by :class:`~sdzero_pl.tasks.MathReward` (last ``\\boxed{}`` against the reference answer).

    python -m sdzero_pl.tasks.evaluate --model checkpoints/tiny-arith --split heldout --n 200 --temperature 0.7
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sdzero_pl.core.prompts import control_phrases, control_text, render_prompt
from sdzero_pl.tasks.arithmetic import Problem, add_settings_arguments, generate_split, settings_from_args
from sdzero_pl.tasks.math import MathReward, extract_last_boxed


@dataclass
class EvalResult:
    accuracy: float  # mean reward over the questions
    boxed_rate: float  # share of completions with a \boxed{} answer
    ended_rate: float  # share that ended their turn (eos) within max_new_tokens
    mean_completion_len: float  # tokens, eos included
    n: int
    completions: list[str]
    rewards: list[float]

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("completions", "rewards")}


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """``chat(x)``: the question as one user turn, with the assistant's generation prompt appended."""
    return render_prompt(tokenizer, question)


def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    temperature: float = 0.7,
    max_new_tokens: int = 96,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[list[str], list[int], list[bool]]:
    """One completion per question: (texts without special tokens, token counts, ended-with-eos flags)."""
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    return continue_texts(model, tokenizer, prompts, temperature, max_new_tokens, batch_size, seed)


@torch.no_grad()
def continue_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    temperature: float = 0.7,
    max_new_tokens: int = 96,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[list[str], list[int], list[bool]]:
    """Sample one continuation of each already-rendered context (plain temperature sampling; 0 = greedy)."""
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}")
    tokenizer.padding_side = "left"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    # Plain temperature sampling: no top-k / top-p truncation from the generation config's defaults.
    sampling = dict(do_sample=True, temperature=temperature, top_k=None, top_p=None) if temperature else {}
    texts, lengths, ended = [], [], []
    try:
        for i in range(0, len(contexts), batch_size):
            batch = tokenizer(
                list(contexts[i : i + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False
            )
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **(sampling or {"do_sample": False}),
            )
            for row in out[:, batch["input_ids"].shape[1] :].tolist():
                n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                ended.append(tokenizer.eos_token_id in row)
                lengths.append(n)
                texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    finally:
        model.train(was_training)
        torch.random.set_rng_state(generator_state)
    return texts, lengths, ended


def evaluate_problems(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    temperature: float = 0.7,
    max_new_tokens: int = 96,
    batch_size: int = 64,
    seed: int = 0,
    reward: MathReward | None = None,
) -> EvalResult:
    """Sample one completion per problem and score it with ``reward`` (a fresh MathReward by default)."""
    texts, lengths, ended = sample_completions(
        model, tokenizer, [p.problem for p in problems], temperature, max_new_tokens, batch_size, seed
    )
    own_reward = reward is None
    reward = reward or MathReward()
    try:
        batch = reward(texts, [p.answer for p in problems])
    finally:
        if own_reward:
            reward.close()
    if batch.skipped:
        raise ValueError(f"{batch.skipped} reference answers could not be parsed: {batch.errors}")
    rewards = [float(r) for r in batch.rewards]
    n = len(problems)
    return EvalResult(
        accuracy=sum(rewards) / n,
        boxed_rate=sum(extract_last_boxed(t) is not None for t in texts) / n,
        ended_rate=sum(ended) / n,
        mean_completion_len=sum(lengths) / n,
        n=n,
        completions=texts,
        rewards=rewards,
    )


# SPEC.md control phrases, paper default; the same "\n\n" separators as both phases.
CONTROLS = control_phrases("paper")  # the same strings training uses


def revision_check(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    initial: EvalResult,
    temperature: float = 0.7,
    max_new_tokens: int = 96,
    seed: int = 0,
    reward: MathReward | None = None,
) -> dict:
    """Generate-then-revise (SPEC "Analyses"): one revision per initial completion from
    ``chat(x) + init + "\\n\\n" + control + "\\n\\n"``; accuracy of the revisions and the correction rate."""
    contexts = [
        chat_prompt(tokenizer, p.problem) + init + control_text(CONTROLS, r)
        for p, init, r in zip(problems, initial.completions, initial.rewards)
    ]
    revisions, _, _ = continue_texts(model, tokenizer, contexts, temperature, max_new_tokens, seed=seed)
    own_reward = reward is None
    reward = reward or MathReward()
    try:
        revised = [float(r) for r in reward(revisions, [p.answer for p in problems]).rewards]
    finally:
        if own_reward:
            reward.close()
    wrong = [v for v, r in zip(revised, initial.rewards) if not r]
    right = [v for v, r in zip(revised, initial.rewards) if r]
    return {
        "revised_accuracy": sum(revised) / len(revised),
        "wrong_to_right": sum(wrong) / max(1, len(wrong)),  # correction rate among wrong initial completions
        "right_to_right": sum(right) / max(1, len(right)),
        "boxed_rate": sum(extract_last_boxed(t) is not None for t in revisions) / len(revisions),
        "examples": list(zip(initial.completions[:5], revisions[:5])),
    }


def summarize_samples(results: Sequence[EvalResult]) -> dict:
    """avg@k (mean accuracy over k independent samples per question), pass@k and the per-sample accuracies."""
    k, n = len(results), results[0].n
    solved = [any(r.rewards[i] for r in results) for i in range(n)]
    return {
        f"avg@{k}": sum(r.accuracy for r in results) / k,
        f"pass@{k}": sum(solved) / n,
        "accuracy_per_sample": [r.accuracy for r in results],
        "boxed_rate": sum(r.boxed_rate for r in results) / k,
        "ended_rate": sum(r.ended_rate for r in results) / k,
        "n": n,
    }


def evaluate_model_dir(model_dir: str | Path, problems: Sequence[Problem], **kwargs) -> EvalResult:
    """:func:`evaluate_problems` on a saved HF directory (model + tokenizer), loaded in float32 on CPU."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return evaluate_problems(model, tokenizer, problems, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Accuracy of an HF model dir on a split of the arithmetic task.")
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="task seed (which questions)")
    parser.add_argument("--sample_seed", type=int, default=0, help="sampling seed of the first sample")
    parser.add_argument("--samples", type=int, default=1, help="samples per question (seeds sample_seed, +1, ...)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    torch.set_num_threads(args.threads)
    problems = generate_split(args.split, args.n, args.seed, settings_from_args(args))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    reward = MathReward()
    try:
        results = [
            evaluate_problems(
                model, tokenizer, problems, args.temperature, args.max_new_tokens, args.batch_size,
                seed=args.sample_seed + i, reward=reward,
            )  # fmt: skip
            for i in range(args.samples)
        ]
    finally:
        reward.close()
    print(json.dumps(results[0].summary() if args.samples == 1 else summarize_samples(results)))


if __name__ == "__main__":
    main()
