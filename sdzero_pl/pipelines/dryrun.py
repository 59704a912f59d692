"""``python -m sdzero_pl.dryrun CONFIG [CONFIG ...]``: a cluster config, checked on a laptop CPU in about a minute.

It runs the config's OWN modules, callbacks, verifier, optimizer and LR schedule, question source and column mapping
through ``main.py``'s LightningCLI for ``--steps`` optimizer steps (``validate`` for evaluation configs), replacing
only what cannot run here, and prints every replacement:

* models that are hub ids, missing directories (another config's output) or too large: a stand-in (``--stand_in``:
  the tiny random Qwen3-style model with a ChatML tokenizer, or any small HF directory, e.g. a pretrained one);
  a missing Phase-1 export of a config in the same folder gets the hand-off record that Phase 1 would write;
* vLLM and HF generate: HF generate on the stand-in, up to ``--max_new_tokens``, every other completion a scripted
  correct answer (``sdzero_pl.pipelines.standins``); ``--rollout vllm`` keeps vLLM (the CPU build, when installed);
* bf16 / FSDP / several devices: float32, one process on the CPU;
* hub datasets: local mirrors with the dataset's REAL configs, splits, columns, types and row counts, from
  ``sdzero_pl/data/hub_schemas.json`` (stored copies of the cards; the live hub can be newer), read through the
  same ``datasets`` code path, so a wrong config, split or column name fails here; a dataset not in that file,
  and a local file that does not exist, gets rows with the config's own field names (said so);
* sizes: Phase-1 / RFT collections take ``--questions`` questions, evaluations ``--eval_questions`` per benchmark.

Before running it checks what only matters on the cluster (held-out rows, per-rank shares, vLLM context
lengths: ``dryrun_checks``). It ends with ``OK`` or the first problem, naming the config key. Exit code 0 / 1.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

import yaml

from sdzero_pl.data.hub import MirrorHub
from sdzero_pl.data.questions import hub_mirrors
from sdzero_pl.pipelines.dryrun_plan import Options, Planner, Report

__all__ = ["Options", "Report", "dry_run", "main"]


# --------------------------------------------------------------------------------------------------- the run
def dry_run(config: str, options: Options) -> Report:
    """Plan, check and run one config; the report says what was replaced and how it ended."""
    start = time.perf_counter()
    raw = yaml.safe_load(Path(config).read_text()) or {}
    report = Report(config)
    report.subcommand = "validate" if str((raw.get("model") or {}).get("class_path", "")).endswith("EvalModule") \
        else "fit"
    hub = MirrorHub(options.workdir / "hub")
    import torch

    threads = torch.get_num_threads()
    if options.stand_in == "tiny":
        torch.set_num_threads(1)  # a 2-layer model gains nothing from more threads, and loses much on a busy CPU
    try:
        with hub_mirrors(hub):
            planner = Planner(config, raw, options, report, hub)
            shutil.rmtree(planner.run_dir, ignore_errors=True)
            cfg = planner.plan()
            if planner.problems:
                report.problem = planner.problems[0]
                return report
            planner.run_dir.mkdir(parents=True, exist_ok=True)
            path = planner.run_dir / "dryrun_config.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            _run(path, report, planner.run_dir)
    except Exception as error:  # the first problem ends the dry run; its message names the flag or the file
        traceback.print_exc()  # where it happened, above the report
        report.problem = (_key_of(str(error)), f"{type(error).__name__}: {error}")
    finally:
        torch.set_num_threads(threads)
        report.seconds = time.perf_counter() - start
    return report


def _run(path: Path, report: Report, run_dir: Path) -> None:
    import lightning as L

    from sdzero_pl.cli import SDZeroCLI
    from sdzero_pl.pipelines.standins import ScriptedRollout, StopAfterSteps

    argv, sys.argv = sys.argv, sys.argv[:1]  # the dry run's own flags are not LightningCLI's
    try:
        cli = SDZeroCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        save_config_kwargs={"overwrite": True}, args=["--config", str(path)], run=False,
                        parser_kwargs={"exit_on_error": False})
    finally:
        sys.argv = argv
    getattr(cli.trainer, report.subcommand)(cli.model, datamodule=cli.datamodule)
    stop = next((c for c in cli.trainer.callbacks if isinstance(c, StopAfterSteps)), None)
    report.learning_rates = stop.learning_rates if stop is not None else []
    holders = [cli.model, cli.datamodule, *cli.trainer.callbacks]
    report.scripted = sum(getattr(h, "rollout").scripted for h in holders
                          if isinstance(getattr(h, "rollout", None), ScriptedRollout))
    report.outputs = sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("**/*")
                            if p.name in ("config.json", "sdzero_handoff.json", "eval_val.json", "budget.json"))
    if report.subcommand == "fit" and not report.learning_rates:
        report.problem = (None, "no optimizer step ran (nothing to train on: see the log above)")


def _key_of(message: str) -> str | None:
    """The config key an error message names (a flag such as `--data.questions.split`, or a parser key)."""
    flag = re.search(r"`--(trainer|model|data)\.([\w.]+)", message)
    if flag:
        section, rest = flag.groups()
        return f"{section}.{rest}" if section == "trainer" else f"{section}.init_args.{rest}"
    parser = re.search(r'Parser key "([\w.]+)"', message)
    option = re.search(r"Option '([\w.]+)' is not accepted", message)
    if parser:
        return parser.group(1) + (f".init_args.{option.group(1)}" if option else "")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdzero_pl.dryrun", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="LightningCLI YAML files (e.g. configs/qwen.yaml)")
    parser.add_argument("--stand_in", default="tiny", help="'tiny' (random tiny Qwen3-style model) or an HF dir")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per training config")
    parser.add_argument("--workdir", type=Path, default=Path("runs/dryrun"), help="stand-ins, mirrors, runs")
    parser.add_argument("--rollout", choices=("scripted", "vllm"), default="scripted",
                        help="'vllm': keep vLLM rollouts (the vLLM CPU build must be installed)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="longest sampled completion")
    parser.add_argument("--questions", type=int, default=8, help="questions of a Phase-1 / RFT collection")
    parser.add_argument("--eval_questions", type=int, default=2, help="questions per benchmark")
    args = parser.parse_args(argv)
    options = Options(args.stand_in, args.steps, args.workdir, args.rollout, args.max_new_tokens, args.questions,
                      args.eval_questions)
    reports = []
    for config in args.configs:
        reports.append(dry_run(config, options))
        print(reports[-1].text(), flush=True)
    failed = [r.config for r in reports if r.problem is not None]
    print(f"{len(reports) - len(failed)} of {len(reports)} config(s) OK" + (f"; problems: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
