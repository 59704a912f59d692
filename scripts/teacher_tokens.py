"""Print, token by token, how the Phase-2 teacher (the reviser) and the student (the generator) score sampled
answers: ``p_student / p_teacher`` per token of y, the teacher's top choice where it gives y's token < 0.5, and the
teacher's greedy revision. The quickest check of whether a model's reviser can teach its generator (SD-Zero needs
it to): see docs/demo_task.md, "Why SD-Zero does not beat the base model here".

    OMP_NUM_THREADS=1 python scripts/teacher_tokens.py --model runs/demo/seed0/srt/hf_model \
        --questions runs/demo/data/phase2.jsonl --n 12
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdzero_pl.core.prompts import control_phrases, control_text, encode_prompts, stop_token_ids
from sdzero_pl.core.sequences import build_distill_example
from sdzero_pl.tasks import MathReward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory (e.g. an SRT export)")
    parser.add_argument("--questions", required=True, help="JSONL with `problem` and `answer` fields")
    parser.add_argument("--n", type=int, default=12, help="questions to sample (the first n)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--control_preset", default="paper")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    phrases = control_phrases(args.control_preset)
    stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    reward = MathReward()
    with open(args.questions, encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(args.n), handle)]
    for row in rows:
        prompt = encode_prompts(tokenizer, [row["problem"]])[0]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=True, temperature=args.temperature,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        y = out[0, len(prompt):].tolist()
        text = tokenizer.decode(y, skip_special_tokens=True)
        r = reward([text], [row["answer"]]).rewards[0] or 0.0
        control = tokenizer.encode(control_text(phrases, r), add_special_tokens=False)
        example = build_distill_example(prompt, y, control, stops, max_teacher_len=1 << 20)
        with torch.no_grad():
            student = model(torch.tensor([example.student_ids])).logits[0].log_softmax(-1)
            teacher = model(torch.tensor([example.teacher_ids])).logits[0].log_softmax(-1)
        s_pos = [i for i, m in enumerate(example.student_mask) if m]
        t_pos = [i for i, m in enumerate(example.teacher_mask) if m]
        cells = []
        for a, b in zip(s_pos, t_pos):
            token = example.student_ids[a]
            p_s, p_t = student[a - 1, token].exp().item(), teacher[b - 1, token].exp().item()
            cell = f"{tokenizer.decode([token])!r}:{p_s:.2f}/{p_t:.2f}"
            if p_t < 0.5:
                cell += f"[{tokenizer.decode([teacher[b - 1].argmax().item()])!r}]"
            cells.append(cell)
        prefix = example.teacher_ids[: len(example.teacher_ids) - len(y)]
        with torch.no_grad():
            revision = model.generate(torch.tensor([prefix]), do_sample=False, max_new_tokens=args.max_new_tokens,
                                      pad_token_id=tokenizer.pad_token_id)
        print(f"r={r:.0f} answer={row['answer']} y={text!r}")
        print("   p_student/p_teacher:", " ".join(cells))
        print("   teacher's greedy revision:", repr(tokenizer.decode(revision[0, len(prefix):], skip_special_tokens=True)))
    reward.close()


if __name__ == "__main__":
    main()
