"""`python -m recipe run --dry-run`: the plan as text, each step with its inputs, outputs and the exact command
it stands for; nothing is started."""

from __future__ import annotations

import json

from recipe.argv import as_text
from recipe.plan import PORT_PLACEHOLDER, MergeStep, PipelineStep, Plan


def print_plan(plan: Plan) -> None:
    """--dry-run: each step, its inputs, outputs and the exact command."""
    kept = f" (a working copy of {plan.store}, the output of record)" if plan.store else ""
    print(f"recipe {plan.name}: {len(plan.steps())} steps planned, outputs in {plan.out}{kept}")
    for index, step in enumerate(plan.steps(), 1):
        print(f"\n[{index}] {step.name}")
        print("    inputs:  " + "\n             ".join(step.inputs))
        print("    outputs: " + "\n             ".join(step.outputs))
        if isinstance(step, PipelineStep):
            print(f"    command: {as_text(step.command())}")
        elif isinstance(step, MergeStep):
            from recipe.merging import describe

            print(f"    merge:   {describe(step)}, in memory (trainer.merge.merge_state_dicts), scored on the "
                  "full run's validation windows (trainer.evaluate.score); no training")
        else:
            port = "PORT"
            service = as_text(step.service_command()).replace(f"--port={PORT_PLACEHOLDER}", f"--port={port}")
            trainer = as_text(step.trainer_command()).replace(f"127.0.0.1:{PORT_PLACEHOLDER}", f"127.0.0.1:{port}")
            print(f"    service: {service}")
            for start, weights in step.later_stages:
                print(f"    then:    PUT /v1/mix {json.dumps({'weights': weights, 'start_step': start})}")
            print(f"    trainer: {trainer}")
    for update in plan.recipe.updates:
        if plan.runs[update.name] is None:
            choose = update.replay.choose
            print(f"\n[then] {update.name}/train: the full run ({update.steps} steps) at the share the pilots choose: "
                  f"the smallest whose forgetting stays within {choose.budget:g} (else: {choose.otherwise})")
    print("\nchecked: every path, key, the model/tokenizer fit, the output folder and the Ray address; nothing "
          "was started or written", flush=True)
