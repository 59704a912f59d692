"""The dry run's checks that need no model: hub names and columns against the stored schemas, held-out rows, sizes
that only matter on the cluster (``sdzero_pl.pipelines.dryrun``). Each returns problems as (config key, message)."""

from __future__ import annotations

from typing import Any

from sdzero_pl.data.hub import HubSchema
from sdzero_pl.data.questions import LOCAL_FORMATS

Problem = tuple[str, str]
VERIFIER_FIELDS = {  # the verifiers' default (question, answer, id) columns (``Verifier.fields``)
    "sdzero_pl.tasks.CodeReward": ("prompt", "examples", "id"),
}
MATH_FIELDS = ("problem", "answer", None)
CODEFORCES_STATEMENT = ("title", "time_limit", "memory_limit", "description", "input_format", "output_format",
                        "note", "examples")


def is_local(dataset: str) -> bool:
    return any(dataset.lower().endswith(suffix) for suffix in LOCAL_FORMATS)


def source_fields(questions: dict, reward: dict | None) -> dict[str, str | None]:
    """The columns a question source reads: its own field names, the verifier's defaults where it names none."""
    defaults = VERIFIER_FIELDS.get((reward or {}).get("class_path", ""), MATH_FIELDS)
    return {"question": questions.get("question_field") or defaults[0],
            "answer": questions.get("answer_field") or defaults[1],
            "id": questions.get("id_field") or defaults[2], "solution": questions.get("solution_field")}


def check_source(key: str, questions: dict, reward: dict | None, schema: HubSchema) -> list[Problem]:
    """A question source (``key`` = its config key) against the stored schema of its hub dataset."""
    config, split = questions.get("dataset_config"), questions.get("split", "train")
    name = schema.config_for(config)
    if name not in schema.configs:
        what = f"no config {config!r}" if config is not None else "no default config: a config name is required"
        return [(f"{key}.dataset_config", f"{schema.name} has {what} (configs: {sorted(schema.configs)})")]
    if split not in schema.configs[name]:
        return [(f"{key}.split", f"{schema.name}[{name}] has no split {split!r} (splits: {sorted(schema.configs[name])})")]
    columns = schema.column_types(name)
    fields = source_fields(questions, reward)
    init = (reward or {}).get("init_args") or {}
    if init.get("statement") == "codeforces":
        fields["question"] = None
        for column in CODEFORCES_STATEMENT:
            if column not in columns:
                return [(f"{_reward_key(key)}.init_args.statement",
                         f"`statement: codeforces` reads {column!r}, which {schema.name}[{name}] does not have")]
    if init.get("private_tests_field"):
        fields["private_tests"] = init["private_tests_field"]
    problems = []
    for role, column in fields.items():
        if column is not None and column not in columns:
            flag = {"private_tests": f"{_reward_key(key)}.init_args.private_tests_field"}.get(role, f"{key}.{role}_field")
            problems.append((flag, f"{schema.name}[{name}:{split}] has no column {column!r} (columns: "
                                   f"{sorted(columns)}; schema confidence: {schema.confidence})"))
    return problems


def _reward_key(questions_key: str) -> str:
    return questions_key.rsplit(".questions", 1)[0] + ".reward"


def check_heldout(key: str, questions: dict, schema: HubSchema, benchmarks: dict[str, Any]) -> list[Problem]:
    """Training rows that reach a held-out benchmark cut from the same split (``openr1``: its last 500 rows)."""
    config, split = schema.config_for(questions.get("dataset_config")), questions.get("split", "train")
    total = schema.split_rows(config, split)
    start = questions.get("skip_first", 0) or 0
    end = total - (questions.get("skip_last", 0) or 0)
    if questions.get("num_questions") is not None:
        end = min(end, start + questions["num_questions"])
    problems = []
    for bench in benchmarks.values():
        if bench.source != schema.name or schema.config_for(bench.config) != config or bench.split != split:
            continue
        held = range(total)[bench.start : bench.stop]
        overlap = max(0, min(end, held.stop) - max(start, held.start))
        if overlap:
            problems.append((f"{key}.skip_last",
                             f"{schema.name}[{config}:{split}]: the run draws from rows {start:,}-{end - 1:,}, "
                             f"{overlap:,} of them the `{bench.name}` benchmark's held-out rows ({held.start:,}-"
                             f"{held.stop - 1:,}); set `skip_last: {total - held.start}` (or `num_questions`)"))
    return problems


def check_sizes(cfg: dict, world: int) -> tuple[list[Problem], list[str]]:
    """Sizes the single-process dry run cannot exercise: per-rank shares on ``world`` ranks, vLLM context lengths,
    the teacher's length budget, teacher syncs past the last step. Returns (problems, notes)."""
    problems, notes = [], []
    data = (cfg.get("data") or {}).get("init_args") or {}
    data_class = (cfg.get("data") or {}).get("class_path", "")
    ppe = data.get("prompts_per_epoch")
    if ppe is not None and world > 1 and ppe % world:
        problems.append(("data.init_args.prompts_per_epoch", f"{ppe} prompts per epoch do not split over the "
                         f"config's {world} ranks (trainer.devices x trainer.num_nodes)"))
    for key, rollout in rollouts(cfg):
        init = rollout.get("init_args") or {}
        new, limit = init.get("max_new_tokens", 1024), init.get("max_model_len")
        revises = data_class.endswith("TraceDataModule") and key.startswith("data.")
        need = 2 * new if revises else new + 1
        if limit is not None and limit < need:
            what = ("a revision is sampled after x + an init of up to max_new_tokens + P_r, so it needs more than "
                    f"2 x {new:,} tokens") if revises else f"x + up to {new:,} new tokens"
            problems.append((f"{key}.init_args.max_model_len", f"max_model_len {limit:,} < {need:,}: {what}; longer "
                             "completions are cut (reference code: 32768 for Phase 1)"))
    teacher_len = data.get("max_teacher_len")
    new = ((data.get("rollout") or {}).get("init_args") or {}).get("max_new_tokens")
    if teacher_len is not None and new is not None and data.get("teacher_context", "revision") == "revision" \
            and teacher_len < 2 * new:
        notes.append(f"data.init_args.max_teacher_len {teacher_len:,} < 2 x max_new_tokens {new:,}: completions "
                     f"longer than about {teacher_len // 2:,} tokens are cut in both sequences (length budget)")
    return problems, notes + _sync_notes(cfg, world)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _sync_notes(cfg: dict, world: int) -> list[str]:
    trainer, data = cfg.get("trainer") or {}, (cfg.get("data") or {}).get("init_args") or {}
    ppe, batch, epochs = data.get("prompts_per_epoch"), data.get("batch_size"), trainer.get("max_epochs")
    if None in (ppe, batch, epochs):
        return []
    sequences = ppe // world * data.get("group_size", 1)
    per_epoch = _ceil(_ceil(sequences, batch) * data.get("ppo_epochs", 1), trainer.get("accumulate_grad_batches", 1))
    steps = epochs * per_epoch
    notes = [f"the config runs {steps:,} optimizer steps ({epochs:,} epochs x {per_epoch}) on {world} rank(s)"]
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict) and callback.get("class_path", "").endswith("TeacherSync"):
            every = (callback.get("init_args") or {}).get("every_n_steps", 0)
            if every and every > steps:
                notes.append(f"TeacherSync every_n_steps {every} > the run's {steps} steps: the teacher never syncs")
    return notes


def rollouts(node: Any, key: str = "") -> list[tuple[str, dict]]:
    """Every rollout backend in the config, with its key."""
    found = []
    if isinstance(node, dict):
        if str(node.get("class_path", "")).startswith("sdzero_pl.rollout."):
            found.append((key, node))
        for name, value in node.items():
            found += rollouts(value, f"{key}.{name}" if key else name)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += rollouts(value, f"{key}[{index}]")
    return found
