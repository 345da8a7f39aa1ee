"""Each part's config object rendered to its command line: one function per part, each tested to
round-trip through that part's own parser (`parse(to_argv(c)) == c`, tests/test_recipe.py).

The recipe plans typed steps holding these config objects (pipeline `TokenizeConfig` and `ExtendConfig`,
the service's `ServiceConfig`, the trainer's `TrainConfig`); the command a step stands for, the one
`--dry-run` prints and the runner starts, is only ever made here. Every flag is spelt `--flag=value`,
so a value that starts with '-' cannot be read as a flag.
"""

from __future__ import annotations

from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any

from pipeline.corpora.manpages import ManpagesConfig
from pipeline.tokenize import TokenizeConfig
from pipeline.tokenizer.extend import ExtendConfig
from pipeline.tokenizer.train import TokenizerTrainConfig
from service.service_config import ServiceConfig
from trainer.hf_model import HF_PREFIX
from trainer.train_config import TrainConfig, flag_of

# TrainConfig fields with no flag of their own (the Adam betas), or rendered together with another field.
_TRAINER_SKIPPED = {"optim.beta1", "optim.beta2", "data.weights"}


def tokenize_argv(c: TokenizeConfig) -> list[str]:
    """`python -m pipeline.tokenize` flags for `c` (`pipeline.tokenize.parse_args`)."""
    argv = [*(f"--input={i}" for i in c.inputs), f"--tokenizer={c.tokenizer}", f"--out={c.out}",
            f"--text-field={c.text_field}", f"--val-fraction={c.val_fraction!r}", f"--seed={c.seed}",
            f"--shard-tokens={c.shard_tokens}"]
    optional = {"--split": c.split, "--config": c.config, "--batch-size": c.batch_size, "--workers": c.workers,
                "--address": c.address, "--num-cpus": c.num_cpus,
                "--chunk-mb": None if c.chunk_bytes is None else repr(c.chunk_bytes / 2**20)}
    argv += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
    return argv + (["--overwrite"] if c.overwrite else [])


def extend_argv(c: ExtendConfig) -> list[str]:
    """`python -m pipeline.tokenizer extend` flags for `c` (`pipeline.tokenizer.__main__.config_from_args`)."""
    argv = ["extend", f"--base={c.base}", *(f"--input={i}" for i in c.inputs),
            *(f"--old-input={i}" for i in c.old_inputs), f"--new-pieces={c.new_pieces}", f"--out={c.out}",
            f"--text-field={c.text_field}", f"--max-sample-bytes={c.max_sample_bytes}",
            f"--max-heldout-bytes={c.max_heldout_bytes}", f"--holdout-fraction={c.holdout_fraction!r}",
            f"--max-old-sample-bytes={c.max_old_sample_bytes}"]
    argv += [flag for flag, on in (("--keep-old-encoding", c.keep_old_encoding), ("--byte-fallback", c.byte_fallback))
             if on]
    return argv + _tokenizer_tail(c)


def train_tokenizer_argv(c: TokenizerTrainConfig) -> list[str]:
    """`python -m pipeline.tokenizer train` flags for `c` (`pipeline.tokenizer.__main__.config_from_args`)."""
    argv = ["train", *(f"--input={i}" for i in c.inputs), f"--out={c.out}", f"--vocab-size={c.vocab_size}",
            f"--kind={c.kind}", f"--model-type={c.model_type}",
            "--byte-fallback" if c.byte_fallback else "--no-byte-fallback",
            f"--character-coverage={c.character_coverage!r}", f"--text-field={c.text_field}",
            f"--max-sample-bytes={c.max_sample_bytes}", f"--holdout-fraction={c.holdout_fraction!r}"]
    return argv + _tokenizer_tail(c)


def _tokenizer_tail(c: ExtendConfig | TokenizerTrainConfig) -> list[str]:
    """The flags `pipeline.tokenizer`'s two commands share that are given only when set."""
    optional = {"--split": c.split, "--address": c.address, "--num-cpus": c.num_cpus}
    return [f"{flag}={value}" for flag, value in optional.items() if value is not None] + \
        (["--overwrite"] if c.overwrite else [])


def manpages_argv(c: ManpagesConfig) -> list[str]:
    """`python -m pipeline.corpora.manpages` flags for `c` (`pipeline.corpora.manpages.parse_args`)."""
    argv = [f"--lang={c.lang}", f"--out={c.out}", f"--man-root={c.man_root}"]
    optional = {"--limit": c.limit, "--address": c.address, "--num-cpus": c.num_cpus}
    return argv + [f"{flag}={value}" for flag, value in optional.items() if value is not None]


def service_argv(c: ServiceConfig) -> list[str]:
    """`python -m service` flags for `c` (`service.service_config.parse_args`)."""
    argv = [*(f"--dataset={name}={path}" for name, path in c.datasets.items()), f"--seq-len={c.seq_len}",
            f"--global-batch={c.global_batch}", f"--seed={c.seed}", f"--state-dir={c.state_dir}",
            f"--reserve-steps={c.reserve_steps}", f"--host={c.host}", f"--port={c.port}", f"--verify={c.verify}",
            f"--log-level={c.log_level}", f"--lease-seconds={c.lease_seconds!r}"]
    if c.standby:
        argv.append("--standby")
    if c.weights is not None:
        argv.append("--weights=" + ",".join(f"{name}={w!r}" for name, w in c.weights.items()))
    optional = {"--admin-token-file": c.admin_token_file, "--read-token-file": c.read_token_file,
                "--max-lookahead": c.max_lookahead, "--ssl-keyfile": c.ssl_keyfile, "--ssl-certfile": c.ssl_certfile}
    argv += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
    if c.allow_anonymous_reads:
        argv.append("--allow-anonymous-reads")
    if c.controller is not None:
        law, settings = c.controller
        argv.append(f"--controller={law}")
        argv += [f"--{key.replace('_', '-')}={value!r}" if isinstance(value, float) else
                 f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    if c.cache is not None:  # given explicitly, so the command means the same whatever the environment says
        argv += [f"--cache-dir={c.cache.folder}", f"--cache-bytes={c.cache.max_bytes}"]
    return argv


def trainer_argv(c: TrainConfig) -> list[str]:
    """`python -m trainer` flags for `c` (`trainer.train_config.parse_args`): every field that is not its
    default, under the flag `train_config.flag_of` names, so a field the trainer adds is rendered too."""
    argv = [f"--out={c.out}"]
    for path, value, default in _leaves(c):
        if path == "out" or path in _TRAINER_SKIPPED or value == default:
            continue
        flag = flag_of(path)
        if path == "hf_model":
            argv.append(f"--init-from={HF_PREFIX}{value}")
        elif path == "progress":
            argv.append("--no-progress")
        elif isinstance(value, bool):
            argv.append(flag)
        elif isinstance(value, dict):
            argv += [f"{flag}={name}={item}" for name, item in value.items()]
        elif isinstance(value, (tuple, list)):
            argv += [f"{flag}={item}" for item in value]
        else:
            argv.append(f"{flag}={value!r}" if isinstance(value, float) else f"{flag}={value}")
    if c.data.datasets and c.data.weights != {name: 1.0 for name in c.data.datasets}:
        argv.append("--weights=" + ",".join(f"{name}={w!r}" for name, w in c.data.weights.items()))
    return argv


def _leaves(config: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, value, the field's default) of every leaf field of a nested dataclass."""
    leaves = []
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            leaves += _leaves(value, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        leaves.append((prefix + f.name, value, default))
    return leaves


def as_text(argv: list[str]) -> str:
    """A command as a shell would take it (each word quoted where it needs it)."""
    import shlex

    return " ".join(shlex.quote(str(a)) for a in argv)


def path_str(value: str | Path | None) -> str | None:
    return None if value is None else str(value)
