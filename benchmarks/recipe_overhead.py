"""The recipe's overhead: `python -m recipe run` against the same steps chained by hand.

    python -m benchmarks.recipe_overhead                 # 600 documents per corpus, 40 steps
    python -m benchmarks.recipe_overhead --quick         # a smoke run

A tiny random Llama with a byte-level BPE tokenizer and English/German corpora are made here. The same
recipe (tokenizer extension, a fixed 25% replay, one full run) is then run twice on the same work, each in
a fresh output folder: by hand, each of its planned commands as the README's "Using the parts" runs them
(a `python -m pipeline...` process per step with its own Ray, then per run `python -m service` and
`python -m trainer` pulling from it); and as one `python -m recipe run`. Printed: each wall time and the
ratio recipe / by hand (the issue's target: at most 1.05).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.plan import PipelineStep, make_plan, with_port  # noqa: E402
from recipe.schema import load_recipe  # noqa: E402
from service.launcher import ServiceProcess, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WORDS = {"en": "the manual page describes how the command reads its input file and writes the result".split(),
         "de": "die handbuchseite beschreibt wie der befehl seine eingabedatei liest und schreibt".split()}

RECIPE = """\
model: hf:model
old: {{en: {{path: en.jsonl, eval: en-heldout.jsonl}}}}
updates:
  - name: de
    new: {{de: {{path: de.jsonl, eval: de-heldout.jsonl}}}}
    tokenizer: {{extend: 40}}
    replay: {{share: 0.25}}
    steps: {steps}
data: {{seq_len: 64, global_batch: 8, micro_batch: 4}}
evaluation: {{every: {every}, batches: 2}}
training: {{checkpoint_every: {every}}}
compute: {{cpus: 2, threads: 1}}
output: {output}
"""


def make_workspace(root: Path, documents: int) -> None:
    """Corpora, held-out files and a model folder (tiny random Llama, byte-level BPE tokenizer)."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = {lang: [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) + "." for _ in range(documents)]
             for lang, words in WORDS.items()}
    for lang, lines in texts.items():
        held = len(lines) // 10
        (root / f"{lang}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[held:]))
        (root / f"{lang}-heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:held]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts["en"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    fast.save_pretrained(root / "model")


def by_hand(recipe_path: Path) -> float:
    """Every planned step as its own command, as a user following the README runs them."""
    recipe, name = load_recipe(recipe_path)
    plan = make_plan(recipe, name)
    started = time.monotonic()
    secrets = Path(recipe.output) / "secrets"
    secrets.mkdir(parents=True)
    for token in ("admin-token", "read-token"):
        (secrets / token).write_text(f"{token}-0123456789abcdef")
    for step in plan.steps():
        if isinstance(step, PipelineStep):
            subprocess.run(step.command(), cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL)
            continue
        Path(step.service.state_dir).mkdir(parents=True)
        port = free_port()
        service_config, trainer_config = with_port(step, port)
        args = [a for a in step.service_command(service_config)[3:]
                if not a.startswith(("--host=", "--port=", "--log-level="))]
        with ServiceProcess(args, port=port, log=Path(str(step.service.state_dir) + ".log")):
            subprocess.run(step.trainer_command(trainer_config), cwd=REPO, env=ENV, check=True,
                           stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def with_recipe(recipe_path: Path) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "recipe", "run", str(recipe_path)], cwd=REPO, env=ENV, check=True,
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 documents per corpus, 8 steps")
    parser.add_argument("--documents", type=int, default=600, help="documents per corpus (default 600)")
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    args = parser.parse_args(argv)
    documents, steps = (200, 8) if args.quick else (args.documents, args.steps)
    with tempfile.TemporaryDirectory(prefix="recipe-overhead-") as tmp:
        root = Path(tmp)
        make_workspace(root, documents)
        times = {}
        for label, run in (("by hand", by_hand), ("recipe", with_recipe)):
            path = root / f"{label.replace(' ', '-')}.yaml"
            path.write_text(RECIPE.format(steps=steps, every=max(1, steps // 4), output=root / f"out-{path.stem}"))
            times[label] = run(path)
            print(f"{label}: {times[label]:.1f} s", flush=True)
    ratio = times["recipe"] / times["by hand"]
    print(f"recipe {times['recipe']:.1f} s / by hand {times['by hand']:.1f} s = {ratio:.3f} "
          f"({'within' if ratio <= 1.05 else 'over'} the 1.05 target; {documents} documents per corpus, {steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
