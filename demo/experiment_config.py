"""What one demo run is: its phase-2 runs and its sizes, loaded by name from a file in `demo/config/`.

A preset (`default`, `quick`, `gpu`) is a small Python file of assignments, one per sized field of
ExperimentConfig, as nanoGPT's `config/` files are: read one to see what a run does, copy one to make
another. What every preset shares (the runs, the seed, the default rates) is ExperimentConfig's own.
"""

from __future__ import annotations

import runpy
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "config"


@dataclass(frozen=True)
class Phase2Run:
    """One continued-pretraining run on German, from the phase-1 checkpoint taken before the anneal."""

    name: str
    replay: float  # share of English (old) sequences in every batch
    rewarm: bool = True  # False: continue phase 1's infinite schedule from its constant phase
    switch_to: float | None = None  # replay set live with `curl -X PUT` halfway through the run
    # The paper's other knobs, one changed per ablation run (None / the default: the preset's recipe).
    max_lr: float | None = None  # the re-warm's peak; its floor stays a tenth of it, as in the paper
    warmup_steps: int | None = None  # the re-warm's length (default 1% of the phase-2 steps)
    reset_optimizer: bool = False  # fresh AdamW state instead of the checkpoint's
    extend_tokenizer: bool = True  # False: German tokenized with the English base tokenizer, no new rows
    seed: int = 0  # the service's sample order (the seed spread); the weights come from the checkpoint

    @property
    def fixed_ratio(self) -> bool:
        """Whether every batch of the run holds `replay` English: the points of the paper's trade-off."""
        return self.switch_to is None

    @property
    def recipe(self) -> bool:
        """The replay table's recipe (re-warmed cosine at the preset's rates, checkpoint's optimizer state,
        extended tokenizer): the runs whose only difference is the replay share."""
        return (self.fixed_ratio and self.rewarm and self.max_lr is None and self.warmup_steps is None
                and not self.reset_optimizer and self.extend_tokenizer)

    @property
    def base(self) -> str:
        """The run's name without its seed suffix: runs differing only by seed share it."""
        return self.name.split("-seed")[0]


@dataclass(frozen=True)
class ControllerRun(Phase2Run):
    """A phase-2 run whose English share the service's forgetting-budget controller steers from `replay`.

    The budget is the most English forgetting the fixed-ratio run `budget_from` showed at any evaluation, so
    the controller is asked to hold the bound that run held, with the least replay; it must be listed after that run. A
    subclass, not more fields of Phase2Run: the other runs' entries in experiment.json stay as they were.
    """

    budget_from: str = "replay-5"
    default_budget: float = 0.02  # when budget_from did not run before it, or did not forget at all
    min_share: float = 0.0
    max_share: float = 0.5

    @property
    def fixed_ratio(self) -> bool:
        return False


@dataclass(frozen=True)
class GrownRun(Phase2Run):
    """A phase-2 run that grows the phase-1 model at its start instead of (or besides) replaying: `blocks`
    inserts identity blocks, `layer_share` more layers (LLaMA Pro's block expansion), trained alone with
    `train="new-blocks"`; `experts` upcycles every MLP into `experts` copies behind a router picking `top_k`
    (sparse upcycling into a Mixtral). A subclass, as ControllerRun is: the other runs' records stay as they were."""

    grow: str = "blocks"  # "blocks" or "experts"
    layer_share: float = 0.25
    experts: int = 4
    top_k: int = 2
    train: str = "all"  # the trainer's --train: all, or new-blocks

    def grow_spec(self, layers: int) -> str:
        """The trainer's --grow for a model of `layers` layers: `layer_share` of them rounded (at least one)."""
        if self.grow == "blocks":
            return f"blocks:{max(1, round(self.layer_share * layers))}"
        return f"experts:{self.experts},top_k:{self.top_k}"

    @property
    def recipe(self) -> bool:
        return False


@dataclass(frozen=True)
class UnionRun:
    """The paper's baseline: a model trained from scratch on English and German together, with the extended
    tokenizer from the start, the paper's cosine schedule, for as many steps as phase 1 + phase 2, with the
    German share of all tokens that the `share_from` replay run saw over both phases."""

    name: str = "union-from-scratch"
    share_from: float = 0.25  # the replay share of the run whose German share the union matches


# Keyword-only, so the sized fields (no default: every preset gives them) keep their place in the field
# order: a work dir's experiment.json, compared text for text, stays what earlier demos wrote.
@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    work_dir: Path
    pages_per_language: int
    val_fraction: float = 0.05  # held-out pages per language: the forgetting/adaptation sets
    base_vocab: int
    new_pieces: int
    model: str
    seq_len: int
    global_batch: int
    micro_batch: int  # sequences per forward pass
    phase1_steps: int
    phase2_steps: int
    eval_every: int
    eval_batches: int
    max_lr: float = 3e-3
    min_lr: float = 3e-4
    device: str = "cpu"
    seed: int = 0
    runs: tuple[Phase2Run, ...] = (
        Phase2Run("replay-0", 0.0),
        Phase2Run("replay-5", 0.05),
        Phase2Run("replay-25", 0.25),
        Phase2Run("replay-50", 0.50),
        Phase2Run("replay-25-no-rewarm", 0.25, rewarm=False),
        Phase2Run("replay-5-to-25-live", 0.05, switch_to=0.25),
        ControllerRun("controller", 0.05),
        # The other strategies, beside replay (no replay: each is the alternative to it).
        GrownRun("grow-blocks-new-only", 0.0, grow="blocks", train="new-blocks"),
        GrownRun("upcycle-moe-4x2", 0.0, grow="experts"),
    )
    extra_trainer_args: tuple[str, ...] = field(default_factory=tuple)
    union: UnionRun | None = UnionRun()
    # The ablations `--findings all` adds, each the replay table's recipe at `ablation_replay` with one
    # knob changed: the re-warm's peak at these multiples of max_lr (with max_lr itself: a 10x span), a
    # re-warm `long_warmup` times longer, the optimizer state reset, and no tokenizer extension.
    ablation_replay: float = 0.25
    lr_multiples: tuple[float, ...] = (1 / 3, 10 / 3)
    long_warmup: int = 10
    # A rendered corpus with fewer pages than this is refused (default: 90% of pages_per_language): a
    # machine missing manpages-de once gave the demo a tenth of its German corpus without a word.
    min_pages: int | None = None
    # Larger local corpora (JSONL with a "text" field) appended to the rendered man pages (`--extra-old`,
    # `--extra-new`): part of the corpus, pinned with it.
    extra_old: Path | None = None
    extra_new: Path | None = None
    # Merges of runs that exist (no training; rebuilt at every report, so not a setting a run was trained
    # with): phase 1's final model and `replay-0` interpolated with these weights on replay-0, and TIES of the
    # two relative to the phase-1 checkpoint both continued from (the reference recipe: density 0.2, lambda 1).
    merge_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    ties_density: float = 0.2

    def phase2_warmup(self) -> int:
        return max(1, self.phase2_steps // 100)

    def ablation_runs(self) -> tuple[Phase2Run, ...]:
        r = self.ablation_replay
        tag = f"replay-{round(100 * r)}"
        return (*(Phase2Run(f"{tag}-lr-{self.max_lr * m:.0e}", r, max_lr=float(f"{self.max_lr * m:.3g}"))
                  for m in self.lr_multiples),
                Phase2Run(f"{tag}-warmup-{self.long_warmup * self.phase2_warmup()}", r,
                          warmup_steps=self.long_warmup * self.phase2_warmup()),
                Phase2Run(f"{tag}-reset-optimizer", r, reset_optimizer=True),
                Phase2Run(f"{tag}-no-tokenizer-extension", r, extend_tokenizer=False))

    def selected_runs(self, findings: str = "headline", seeds: int = 1) -> tuple[Phase2Run, ...]:
        """The phase-2 runs of one invocation, in training order: the headline runs, the ablations with
        `findings="all"`, and the replay table's runs again with seeds 1..seeds-1 (the spread). The controller
        run stays last of the headline runs' block: it takes its budget from a run before it."""
        runs = list(self.runs)
        if findings == "all":
            runs += self.ablation_runs()
        runs += [replace(spec, name=f"{spec.name}-seed{seed}", seed=seed)
                 for seed in range(1, seeds) for spec in self.runs if spec.recipe]
        return tuple(runs)

    @property
    def min_pages_per_language(self) -> int:
        return self.min_pages if self.min_pages is not None else int(0.9 * self.pages_per_language)

    @property
    def union_steps(self) -> int:
        return self.phase1_steps + self.phase2_steps

    @property
    def union_german_share(self) -> float:
        """German's share of every token the `share_from` replay run saw, phase 1 (to its checkpoint) and
        phase 2 together; the union sees it from its first step."""
        assert self.union is not None
        german = self.phase2_steps * (1 - self.union.share_from)
        return round(german / (self.phase1_anneal_start + self.phase2_steps), 4)

    def rate_args(self) -> list[str]:
        """The peak and final rates of a fresh schedule (a continued one keeps its checkpoint's)."""
        return [f"--max-lr={self.max_lr}", f"--min-lr={self.min_lr}"]

    def infinite_schedule_args(self) -> list[str]:
        """Phase 1's infinite schedule with the paper's split: warmup 1%, cooldown to 60%, constant to 85%,
        anneal for the rest."""
        steps = self.phase1_steps
        return ["--lr-schedule=infinite", f"--warmup-steps={max(1, steps // 100)}",
                f"--cooldown-steps={round(0.59 * steps)}", *self.rate_args()]

    @staticmethod
    def anneal_steps(steps: int) -> int:
        """The infinite schedule's anneal: the last 15% of a run's steps (the paper's split)."""
        return round(0.15 * steps)

    @property
    def phase1_anneal_start(self) -> int:
        return self.phase1_steps - self.anneal_steps(self.phase1_steps)


def preset_names() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.py"))


def load_config(name: str) -> ExperimentConfig:
    """The preset `demo/config/NAME.py`: its assignments are ExperimentConfig's fields; work_dir is
    relative to the repository."""
    path = CONFIG_DIR / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"no demo preset {name!r} (have: {', '.join(preset_names())})")
    settings = {key: value for key, value in runpy.run_path(str(path)).items() if not key.startswith("_")}
    unknown = settings.keys() - {f.name for f in fields(ExperimentConfig)}
    if unknown:  # a misspelt name would otherwise be ignored and its field left at the default
        raise ValueError(f"{path}: not settings of a demo run: {', '.join(sorted(unknown))}")
    if "work_dir" in settings:
        settings["work_dir"] = REPO / settings["work_dir"]
    try:
        return ExperimentConfig(**settings)
    except TypeError as missing:  # a sized field the preset does not give
        raise ValueError(f"{path}: {missing}") from None
