"""The dry run's plan (``sdzero_pl.pipelines.dryrun``): one config rewritten for the CPU, every replacement recorded
with its config key, and the static checks of ``dryrun_checks`` collected as problems."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdzero_pl.data.hub import MirrorHub
from sdzero_pl.data.questions import QuestionSource, load_rows
from sdzero_pl.pipelines import dryrun_checks as checks
from sdzero_pl.pipelines.standins import (
    emulate_handoff, model_copy, solutions_for, stand_in_model, synthetic_local_rows
)

SCRIPTED = "sdzero_pl.pipelines.standins.ScriptedRollout"
COLLECTORS = ("TraceDataModule", "RFTDataModule")
LARGE_MODEL_BYTES = 1 << 30  # a local model directory above this is replaced by the stand-in


@dataclass(frozen=True)
class Options:
    """The dry run's own settings (``python -m sdzero_pl.dryrun --help`` documents each)."""

    stand_in: str = "tiny"
    steps: int = 2
    workdir: Path = Path("runs/dryrun")
    rollout: str = "scripted"
    max_new_tokens: int = 16
    questions: int = 8
    eval_questions: int = 2


@dataclass
class Report:
    """What one dry run replaced, noticed and ran, and its first problem as (config key or None, message)."""

    config: str
    subcommand: str = "fit"
    replaced: list[tuple[str, Any, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problem: tuple[str | None, str] | None = None
    learning_rates: list[float] = field(default_factory=list)
    scripted: int = 0
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def replace(self, key: str, old: Any, new: Any) -> Any:
        self.replaced.append((key, old, new))
        return new

    def text(self) -> str:
        lines = [f"== dry run: {self.config} ({self.subcommand})", "replaced:"]
        lines += [f"  {key}: {_short(old)} -> {_short(new)}" for key, old, new in self.replaced]
        lines += ["notes:"] + [f"  {note}" for note in self.notes]
        if self.problem is not None:
            key, message = self.problem
            lines.append(f"PROBLEM at {key}: {message}" if key else f"PROBLEM: {message}")
        else:
            steps = len(self.learning_rates)
            done = f"{steps} optimizer step(s), lr {', '.join(f'{lr:.3g}' for lr in self.learning_rates)}; " \
                if self.subcommand == "fit" else ""
            lines.append(f"OK: {done}{self.scripted} scripted completion(s); outputs: {', '.join(self.outputs)} "
                         f"({self.seconds:.1f} s)")
        return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 100 else text[:97] + "..."


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


class Planner:
    """Rewrites one config for the CPU (recording each replacement) and runs the static checks."""

    def __init__(self, config: str, raw: dict, options: Options, report: Report, hub: MirrorHub) -> None:
        self.config, self.raw, self.options, self.report, self.hub = config, raw, options, report, hub
        self.cfg = copy.deepcopy(raw)
        self.workdir = options.workdir
        self.run_dir = options.workdir / "runs" / _slug(config)
        self.stand_in = stand_in_model(options.stand_in, options.workdir)
        self.problems: list[tuple[str, str]] = []
        self.solutions: dict[str, str] = {}

    def plan(self) -> dict:
        cfg, trainer = self.cfg, self.cfg.setdefault("trainer", {})
        devices = trainer.get("devices", 1)
        world = (devices if isinstance(devices, int) else 1) * (trainer.get("num_nodes") or 1)
        problems, notes = checks.check_sizes(self.raw, world)
        self.problems += problems
        self.report.notes += notes
        self._trainer(trainer)
        self._models()
        self._data()
        self._rollouts()
        self.report.notes.append("not exercised here: " + ", ".join(
            (["the vLLM engine (--rollout vllm, with the vLLM CPU build)"] if self.options.rollout != "vllm" else [])
            + ["the real model and tokenizer", "bf16", "FSDP / DDP / several nodes", "the real rows' content"]))
        return cfg

    # -------------------------------------------------------------------------------------- trainer
    def _trainer(self, trainer: dict) -> None:
        report = self.report
        for key, new in (("accelerator", "cpu"), ("devices", 1), ("num_nodes", 1)):
            if trainer.get(key, new) != new:
                trainer[key] = report.replace(f"trainer.{key}", trainer[key], new)
        if trainer.get("strategy") not in (None, "auto"):
            report.replace("trainer.strategy", trainer.pop("strategy"), "auto (one process)")
        if str(trainer.get("precision", "32-true")) not in ("32", "32-true"):
            trainer["precision"] = report.replace("trainer.precision", trainer["precision"], "32-true")
        trainer["default_root_dir"] = report.replace("trainer.default_root_dir", trainer.get("default_root_dir"),
                                                     str(self.run_dir))
        trainer.update(enable_progress_bar=False, enable_model_summary=False)
        callbacks = []
        for callback in trainer.get("callbacks") or []:
            name = callback.get("class_path", "") if isinstance(callback, dict) else str(callback)
            if name.endswith("VLLMWeightRefresh") and self.options.rollout != "vllm":
                report.replace("trainer.callbacks", name, "(dropped: HF generate samples the live model)")
                continue
            if name.endswith("SelfLocalizationLogger"):
                init = callback.setdefault("init_args", {})
                if init.get("num_responses", 200) > 8:
                    init["num_responses"] = report.replace(f"{name}.num_responses", init.get("num_responses", 200), 8)
            callbacks.append(callback)
        if self.report.subcommand == "fit":
            callbacks.append({"class_path": "sdzero_pl.pipelines.standins.StopAfterSteps",
                              "init_args": {"steps": self.options.steps}})
            report.replace("trainer.callbacks", "+", f"StopAfterSteps({self.options.steps}): the LR schedule keeps "
                           "the config's length")
        trainer["callbacks"] = callbacks

    # --------------------------------------------------------------------------------------- models
    def _models(self) -> None:
        init = self.cfg.get("model", {}).setdefault("init_args", {})
        for key in ("model_name_or_path", "teacher_name_or_path"):
            value = init.get(key)
            if value is None or self._runs_here(value):
                continue
            producer = self._producer(value, "model")
            target = self.stand_in
            phase1 = self._phase1(producer) if producer is not None else None
            if phase1 is not None:
                target = model_copy(self.stand_in, self.workdir / "stand_in" / f"from_{_slug(producer[0])}")
                emulate_handoff(target, *phase1)
                self.report.notes.append(f"{producer[0]} (Phase 1) writes {value}: its hand-off record emulated "
                                         f"({len(phase1[2]):,} question ids, control phrases, instruction)")
            init[key] = self.report.replace(f"model.init_args.{key}", value, str(target))
        if init.get("dtype", "bfloat16") != "float32":
            init["dtype"] = self.report.replace("model.init_args.dtype", init.get("dtype", "bfloat16"), "float32")
        if init.get("export_dir"):
            init["export_dir"] = self.report.replace("model.init_args.export_dir", init["export_dir"],
                                                     str(self.run_dir / "export"))

    def _runs_here(self, path: str) -> bool:
        local = Path(path)
        if not (local / "config.json").is_file():
            return False
        size = sum(f.stat().st_size for f in local.rglob("*.safetensors")) + sum(
            f.stat().st_size for f in local.rglob("*.bin"))
        return size < LARGE_MODEL_BYTES

    def _producer(self, path: str, kind: str) -> tuple[str, dict] | None:
        """The config of the same folder whose run writes ``path`` (its export or its Phase-1 id list)."""
        folder = next((p for p in Path(self.config).resolve().parents if p.name == "configs"),
                      Path(self.config).resolve().parent)
        want = Path(path).as_posix().rstrip("/")
        for other in sorted(folder.rglob("*.yaml")):
            raw = yaml.safe_load(other.read_text()) or {}
            root = (raw.get("trainer") or {}).get("default_root_dir")
            if not root:
                continue
            outputs = {"model": ((raw.get("model") or {}).get("init_args") or {}).get("export_dir") or f"{root}/hf_model",
                       "ids": f"{((raw.get('data') or {}).get('init_args') or {}).get('output_dir') or root + '/srt_data'}"
                              "/phase1_question_ids.json"}
            if Path(outputs[kind]).as_posix().rstrip("/") == want:
                return str(other.relative_to(folder.parent)), raw
        return None

    def _phase1(self, producer: tuple[str, dict]) -> tuple[QuestionSource, Any, list[str]] | None:
        """The question source, control phrases and question ids of a Phase-1 producer (None: not Phase 1)."""
        name, raw = producer
        data = raw.get("data") or {}
        if not data.get("class_path", "").endswith("TraceDataModule"):
            self.report.notes.append(f"{name} writes this path; it is not a Phase-1 config: nothing emulated")
            return None
        init = data.get("init_args") or {}
        questions = dict(init.get("questions") or {})
        if checks.is_local(questions.get("dataset", "x.jsonl")):
            questions["dataset"] = self._local_file(questions, init.get("reward"), raw)
        source = QuestionSource(**questions)
        from sdzero_pl.core.prompts import ControlPhrases

        loaded = _instantiate(init.get("reward"), "sdzero_pl.tasks.MathReward").load_questions(source)
        ids = [q.id for q in source.select(loaded, init.get("seed", 0))]
        return source, ControlPhrases(**(init.get("control") or {})), ids

    # ----------------------------------------------------------------------------------------- data
    def _data(self) -> None:
        data = self.cfg.get("data") or {}
        init, data_class = data.setdefault("init_args", {}), data.get("class_path", "")
        if "questions" in init:
            self._questions("data.init_args.questions", init)
        if data_class.endswith(COLLECTORS):
            questions = init["questions"]
            n = questions.get("num_questions")
            if n is None or n > self.options.questions:
                questions["num_questions"] = self.report.replace("data.init_args.questions.num_questions", n,
                                                                 self.options.questions)
            chunk = max(1, self.options.questions // 2)
            if init.get("questions_per_chunk", 64) > chunk:
                init["questions_per_chunk"] = self.report.replace("data.init_args.questions_per_chunk",
                                                                  init.get("questions_per_chunk", 64), chunk)
        if init.get("output_dir"):
            init["output_dir"] = self.report.replace("data.init_args.output_dir", init["output_dir"],
                                                     str(self.run_dir / "data"))
        if data_class.endswith("EvalDataModule"):
            self._benchmarks("data.init_args", init)
        for index, callback in enumerate((self.cfg.get("trainer") or {}).get("callbacks") or []):
            cb_init = callback.get("init_args", {}) if isinstance(callback, dict) else {}
            if isinstance(cb_init.get("data"), dict):
                self._benchmarks(f"trainer.callbacks[{index}].init_args.data.init_args",
                                 cb_init["data"].setdefault("init_args", {}))
        for key, reward in _rewards(self.cfg):
            reward_init = reward.setdefault("init_args", {})
            if reward_init.get("num_workers", 1) > 1:
                reward_init["num_workers"] = self.report.replace(f"{key}.init_args.num_workers",
                                                                 reward_init["num_workers"], 1)

    def _questions(self, key: str, init: dict) -> None:
        questions, reward = init["questions"], init.get("reward")
        dataset = questions["dataset"]
        if checks.is_local(dataset):
            if not Path(dataset).is_file():
                questions["dataset"] = self.report.replace(f"{key}.dataset", dataset,
                                                           self._local_file(questions, reward, self.raw))
            else:
                self._solutions(QuestionSource(**questions), reward)
        elif dataset in self.hub.schemas:
            schema = self.hub.schemas[dataset]
            self.problems += checks.check_source(key, questions, reward, schema)
            if schema.domain == "math" and not self.problems:
                from sdzero_pl.evaluation.benchmarks import BENCHMARKS

                self.problems += checks.check_heldout(key, questions, schema, BENCHMARKS)
            self.report.notes.append(f"{key}.dataset {dataset}: mirror of its stored schema ({schema.confidence})")
        else:
            questions["dataset"] = self.report.replace(f"{key}.dataset", dataset,
                                                       self._local_file(questions, reward, self.raw))
            self.report.notes.append(f"{dataset} is not in sdzero_pl/data/hub_schemas.json: rows from the config's own "
                                     "field names; its config, split and column names are NOT checked")
        for extra in ("exclude_ids_file",):
            path = questions.get(extra)
            if path and not Path(path).is_file():
                producer = self._producer(path, "ids")
                phase1 = self._phase1(producer) if producer is not None else None
                ids = phase1[2] if phase1 is not None else []
                target = self.workdir / "data" / _slug(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(ids))
                origin = f"ids {producer[0]} would write" if phase1 else "an empty list"
                questions[extra] = self.report.replace(f"{key}.{extra}", path, f"{target} ({origin})")
                questions[extra] = str(target)

    def _local_file(self, questions: dict, reward: dict | None, raw: dict) -> str:
        """A synthetic file for a local question file that does not exist, named after the original path so every
        config that reads the same path reads the same rows."""
        fields = checks.source_fields(questions, reward)
        code = (reward or {}).get("class_path", "").endswith("CodeReward")
        data = (raw.get("data") or {}).get("init_args") or {}
        epochs = (raw.get("trainer") or {}).get("max_epochs") or 1
        need = (questions.get("skip_first") or 0) + (questions.get("skip_last") or 0) + max(
            questions.get("num_questions") or 0, (data.get("prompts_per_epoch") or 0) * epochs)
        count = max(need, 1024)
        original = questions["dataset"]
        path = self.workdir / "data" / hashlib.sha1(original.encode()).hexdigest()[:10] / f"{Path(original).stem}.jsonl"
        if not path.is_file() or sum(1 for _ in path.open()) < count:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_local_rows(fields, code, count)))
        return str(path)

    def _solutions(self, source: QuestionSource, reward: dict | None) -> None:
        verifier = _instantiate(reward, "sdzero_pl.tasks.MathReward")
        if source.solution_field is None and "solution" in load_rows(source.dataset, source.dataset_config,
                                                                     source.split)[0][0]:
            source = dataclasses.replace(source, solution_field="solution")  # worked solutions: what a verifier
        self.solutions.update(solutions_for(verifier.load_questions(source)))  # of steps accepts

    def _benchmarks(self, key: str, init: dict) -> None:
        from sdzero_pl.evaluation.benchmarks import PAPER_BENCHMARKS, resolve_benchmark

        overrides = init.get("benchmark_overrides") or {}
        entries = list(init.get("benchmarks") or PAPER_BENCHMARKS)
        for index, entry in enumerate(entries):
            if checks.is_local(entry) and not Path(entry).is_file():
                stem = Path(entry).stem
                fields = {"question": "problem", "answer": "answer", "id": overrides.get(stem, {}).get("id_field")}
                bench = {"dataset": entry, "question_field": overrides.get(stem, {}).get("question_field"),
                         "answer_field": overrides.get(stem, {}).get("answer_field"), "id_field": fields["id"]}
                entries[index] = self.report.replace(f"{key}.benchmarks[{index}]", entry, self._local_file(bench, None, {}))
                continue
            bench = resolve_benchmark(entry, overrides)
            if checks.is_local(bench.source):  # a real local file: scripted completions can answer its rows
                from sdzero_pl.evaluation.benchmarks import load_benchmark

                self.solutions.update(solutions_for(load_benchmark(bench).questions))
            elif bench.source in self.hub.schemas:
                questions = {"dataset_config": bench.config, "split": bench.split, "question_field": bench.question_field,
                             "answer_field": bench.answer_field, "id_field": bench.id_field}
                where = f"{key}.benchmark_overrides.{bench.name}" if bench.name in overrides else \
                    f"{key}.benchmarks[{index}] ({bench.name})"
                for _, message in checks.check_source(where, questions, None, self.hub.schemas[bench.source]):
                    self.problems.append((where, message))
            elif not checks.is_local(bench.source):
                self.report.notes.append(f"benchmark {bench.name}: {bench.source} is not in hub_schemas.json: not "
                                         "checked, and it cannot load offline")
        init["benchmarks"] = entries
        if init.get("max_questions") is None or init["max_questions"] > self.options.eval_questions:
            init["max_questions"] = self.report.replace(f"{key}.max_questions", init.get("max_questions"),
                                                        self.options.eval_questions)

    # ------------------------------------------------------------------------------------- rollouts
    def _rollouts(self) -> None:
        solutions = None
        if self.solutions:
            solutions = self.workdir / "data" / f"solutions_{_slug(self.config)}.json"
            solutions.parent.mkdir(parents=True, exist_ok=True)
            solutions.write_text(json.dumps(self.solutions))
        for key, rollout in checks.rollouts(self.cfg):
            init = rollout.get("init_args") or {}
            new = min(init.get("max_new_tokens", 1024), self.options.max_new_tokens)
            if self.options.rollout == "vllm" and rollout["class_path"].endswith("VLLMRollout"):
                changed = {"max_new_tokens": new, "dtype": "float32", "enforce_eager": True,
                           "enable_sleep_mode": False, "max_model_len": None}  # None: the stand-in's own
                # vLLM's CPU build cannot split a seeded batch's prefill into chunks ("CPU Generator does not use
                # offset"): one large prefill budget avoids the split
                changed["engine_kwargs"] = {**(init.get("engine_kwargs") or {}), "max_num_batched_tokens": 65536}
                for name, value in changed.items():
                    if init.get(name) != value:
                        init[name] = self.report.replace(f"{key}.init_args.{name}", init.get(name), value)
                rollout["init_args"] = init
                continue
            replacement = {"temperature": init.get("temperature", 1.0), "top_p": init.get("top_p", 1.0),
                           "max_new_tokens": new, "solutions_file": str(solutions) if solutions else None}
            old = f"{rollout['class_path']} (max_new_tokens {init.get('max_new_tokens', 1024)})"
            self.report.replace(key, old, f"ScriptedRollout (HF generate on the stand-in, max_new_tokens {new}, "
                                          "every other completion a scripted correct answer)")
            rollout.clear()
            rollout.update(class_path=SCRIPTED, init_args=replacement)


def _rewards(cfg: dict) -> list[tuple[str, dict]]:
    found = []
    for key, holder in (("data.init_args.reward", (cfg.get("data") or {}).get("init_args") or {}),
                        ("model.init_args.reward", (cfg.get("model") or {}).get("init_args") or {})):
        if isinstance(holder.get("reward"), dict):
            found.append((key, holder["reward"]))
    return found


def _instantiate(spec: dict | None, default: str) -> Any:
    spec = spec or {"class_path": default}
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))
