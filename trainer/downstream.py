"""Downstream evaluation with lm-evaluation-harness (`lm_eval`, the `downstream` extra): named harness tasks
scored on Hugging Face folders, before and after, with the difference per task and metric.

    python -m trainer.downstream --tasks hellaswag,arc_easy runs/base/hf runs/de/hf
    python -m trainer.downstream --tasks my_task --include tasks/ --out scores.json BEFORE_HF AFTER_HF

The first folder is the before (the model a run continued), each further one an after (a run's RUN_DIR/hf).
The models are scored by the trainer's own `HFCausalLM` (on --device), not by the harness's `HFLM`, which
would pull in `accelerate`: only loglikelihood requests are served (multiple_choice and loglikelihood
tasks, as the paper's downstream suites are); a task that generates text or scores rolling perplexity is
refused. Harness tasks are YAML files: its own (which fetch their data from the Hub, so they need a network
or a filled Hugging Face cache) or a folder of your own given with --include (`dataset_path: json` with
local `data_files` works offline). Printed: a table of each task's metrics, before, after and after - before;
--out also writes them as JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from trainer.errors import TrainerError

EXTRA = "downstream"


class DownstreamError(TrainerError):
    """Downstream evaluation cannot run as asked; the message names the task, folder or extra."""


def _require_harness() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise DownstreamError(f"downstream evaluation needs lm-evaluation-harness, which is not installed; install "
                              f"the {EXTRA} extra (pip install 'replaymix[{EXTRA}]', or pip install lm-eval)")


def _harness_lm(model: Any, tokenizer: Any, device: torch.device, max_length: int) -> Any:
    """The harness's `LM` interface over an `HFCausalLM` and its tokenizer (made here: lm_eval is optional)."""
    from lm_eval.api.model import LM

    class TrainerLM(LM):
        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return [self._score(*request.args) for request in requests]

        @torch.no_grad()
        def _score(self, context: str, continuation: str) -> tuple[float, bool]:
            # As the harness's HFLM: a context's trailing blanks belong to the continuation, the continuation's
            # tokens are the whole text's past the context's, and the text follows a BOS (or EOS) token.
            blanks = len(context) - len(context.rstrip())
            context, continuation = context[:len(context) - blanks], context[len(context) - blanks:] + continuation
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            answer = whole[len(context_ids):]
            if not answer:
                return 0.0, True
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            tokens = ([start] + whole)[-(max_length + 1):]
            ids = torch.tensor([tokens[:-1]], device=device)
            logprobs = torch.log_softmax(model(ids)[0, -len(answer):].float(), dim=-1)
            targets = torch.tensor(answer, device=device)
            chosen = logprobs.gather(1, targets[:, None])[:, 0]
            return chosen.sum().item(), bool((logprobs.argmax(-1) == targets).all())

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            raise DownstreamError("a task scores rolling perplexity, which trainer.downstream does not serve; "
                                  "choose multiple_choice or loglikelihood tasks")

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            raise DownstreamError("a task generates text, which trainer.downstream does not serve; choose "
                                  "multiple_choice or loglikelihood tasks")

    return TrainerLM()


@functools.lru_cache(maxsize=4)
def task_manager(include: Path | None) -> Any:
    """The harness's index of its own tasks and `include`'s: seconds to build (thousands of YAML files), so once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include) if include is not None else None)


def check_tasks(tasks: Sequence[str], include: Path | None, flags: tuple[str, str] = ("--tasks", "--include")) -> Any:
    """The harness's task manager, once every task is known to it (its own, or one in `include`); `flags`:
    the CLI's names of the two."""
    _require_harness()
    if include is not None and not Path(include).is_dir():
        raise DownstreamError(f"{flags[1]} {include}: no such folder of task YAML files")
    manager = task_manager(include)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f"lm-eval's own tasks or {include}" if include else f"lm-eval's own tasks (give {flags[1]} DIR for yours)"
        raise DownstreamError(f"{flags[0]} {', '.join(unknown)}: no such harness task among {where}")
    return manager


def evaluate(folder: Path, tasks: Sequence[str], manager: Any, device: str = "cpu",
             limit: int | None = None) -> dict[str, dict[str, float]]:
    """task -> metric -> score of the Hugging Face model in `folder` (with its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.hf_model import HFCausalLM

    if not (Path(folder) / "config.json").is_file():
        raise DownstreamError(f"{folder}: no config.json, so not a Hugging Face model folder; give a folder "
                              "`save_pretrained` wrote, e.g. a run's RUN_DIR/hf")
    model = HFCausalLM(AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return evaluate_model(model, tokenizer, tasks, manager, torch.device(device), limit)


def evaluate_model(model: Any, tokenizer: Any, tasks: Sequence[str], manager: Any, device: torch.device,
                   limit: int | None = None) -> dict[str, dict[str, float]]:
    """task -> metric -> score of an `HFCausalLM` (in eval mode for the while) with its tokenizer."""
    from lm_eval import simple_evaluate

    was_training = model.training
    model.eval()
    max_length = getattr(model.config, "max_position_embeddings", 2048)
    try:
        results = simple_evaluate(model=_harness_lm(model, tokenizer, device, max_length), tasks=list(tasks),
                                  task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=0)["results"]
    finally:
        model.train(was_training)
    # The harness names a metric "acc,none" (metric, filter); its stderr, alias and sample count are left out.
    return {task: {key.split(",")[0]: float(value) for key, value in metrics.items()
                   if "," in key and isinstance(value, (int, float)) and "_stderr" not in key}
            for task, metrics in results.items()}


def differences(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """after - before, per task and metric both have."""
    return {task: {m: after[task][m] - before[task][m] for m in after[task] if m in before.get(task, {})}
            for task in after}


def downstream_record(step: int, scores: dict[str, dict[str, float]], first: dict[str, dict[str, float]]) -> dict:
    """The metrics.jsonl line of one downstream evaluation in a run (`--downstream-tasks`): the scores, and
    their change since the run's first (+: the metric rose)."""
    return {"kind": "downstream", "step": step, "scores": scores, "change": differences(first, scores)}


class RunDownstream:
    """--downstream-tasks in a training run: the tasks scored by rank 0 on the model being trained, with the
    run's tokenizer, at the run's start (step 0) and at its last step; the change is against the first."""

    def __init__(self, tasks: Sequence[str], include: Path | None, limit: int | None, tokenizer_dir: Path | None):
        if tokenizer_dir is None:
            raise DownstreamError("--downstream-tasks needs a Hugging Face model (--init-from hf:PATH): its tokenizer "
                                  "turns the tasks' text into token ids")
        self.tasks, self.limit = tuple(tasks), limit
        self.manager = check_tasks(self.tasks, include, ("--downstream-tasks", "--downstream-include"))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.first: dict[str, dict[str, float]] | None = None  # a resumed run's, read back from its metrics

    def record(self, model: Any, device: torch.device, step: int) -> dict:
        scores = evaluate_model(model, self.tokenizer, self.tasks, self.manager, device, self.limit)
        self.first = self.first or scores
        return downstream_record(step, scores, self.first)


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.errors import report_user_error

    p = argparse.ArgumentParser(prog="python -m trainer.downstream", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    p.add_argument("folders", nargs="+", type=Path, metavar="HF_FOLDER",
                   help="the model before (the first), then each model after (Hugging Face folders, e.g. RUN_DIR/hf)")
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="harness task names, comma-separated (required)")
    p.add_argument("--include", type=Path, metavar="DIR", help="a folder of your own task YAML files (default: none)")
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N documents of each task (default: all)")
    p.add_argument("--device", default="cpu", help="where to score (default %(default)s)")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the scores and differences as JSON")
    args = p.parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    try:
        manager = check_tasks(tasks, args.include)
        scores = {str(folder): evaluate(folder, tasks, manager, args.device, args.limit) for folder in args.folders}
    except TrainerError as e:
        return report_user_error(e)
    before = scores[str(args.folders[0])]
    report = {"before": str(args.folders[0]), "scores": scores,
              "change": {str(f): differences(before, scores[str(f)]) for f in args.folders[1:]}}
    if len(args.folders) == 1:
        print(json.dumps(before, indent=2))
    for folder in args.folders[1:]:
        print(f"{folder} against {args.folders[0]}:")
        for task, metrics in scores[str(folder)].items():
            for metric, value in metrics.items():
                print(f"  {task:<24} {metric:<12} {before[task][metric]:>10.4f} -> {value:>10.4f}  "
                      f"{value - before[task][metric]:+.4f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
