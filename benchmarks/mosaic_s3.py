"""The MosaicML Streaming side of `benchmarks/stream.py`'s object-storage rows, run in its own interpreter.

MosaicML Streaming pins its own torch and transformers, so it lives in a separate virtual environment
(`--mosaic-python`, e.g. /tmp/benchvenv) and this script imports nothing of replaymix: only numpy and
`streaming`. The S3 endpoint and credentials come from the environment stream.py sets (`S3_ENDPOINT_URL`,
`AWS_*`), pointing at the benchmark's own moto server on 127.0.0.1.

    prepare  write each .npy of windows (rows of seq_len + 1 tokens, as replaymix's mixer cuts them) as an
             uncompressed MDS dataset under REMOTE/NAME, in shards of --size-limit bytes (untimed)
    read     open the streams with an empty local cache and read --steps batches of --batch rows mixed by
             --weights (shuffled, StreamingDataset's own proportions); print {"seconds", "rows", "tokens",
             "fetched_bytes"} as JSON, timed from opening the dataset to the last batch (imports excluded).
             Mosaic checks no hash here (its default); replaymix's reader checks each fetched shard's sha256.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def prepare(windows: dict[str, Path], remote: str, staging: Path, size_limit: int) -> None:
    import numpy as np
    from streaming import MDSWriter

    for name, path in windows.items():
        rows = np.load(path)
        columns = {"tokens": f"ndarray:{rows.dtype.name}:{rows.shape[1]}"}
        with MDSWriter(out=(str(staging / name), f"{remote}/{name}"), columns=columns, compression=None,
                       size_limit=size_limit) as writer:
            for row in rows:
                writer.write({"tokens": row})


def read(remote: str, local: Path, weights: dict[str, float], steps: int, batch: int) -> dict:
    import numpy as np
    from streaming import Stream, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # a killed earlier run's shared memory would refuse this one
    started = time.perf_counter()
    streams = [Stream(remote=f"{remote}/{name}", local=str(local / name), proportion=weight)
               for name, weight in weights.items()]
    # epoch_size: exactly the samples read, so no time goes to partitioning samples never asked for.
    dataset = StreamingDataset(streams=streams, batch_size=batch, shuffle=True, shuffle_seed=0,
                               epoch_size=steps * batch)
    rows, tokens, served = [], 0, 0
    for sample in dataset:
        rows.append(sample["tokens"])
        if len(rows) == batch:
            out = np.stack(rows).astype(np.int64)  # what the mixer hands a trainer: int64 (batch, seq_len + 1)
            tokens += out.size
            served += 1
            rows = []
            if served == steps:
                break
    seconds = time.perf_counter() - started
    fetched = sum(f.stat().st_size for f in local.rglob("*.mds"))  # the shards it downloaded
    return {"seconds": seconds, "rows": served * batch, "tokens": tokens, "fetched_bytes": fetched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--windows", nargs="+", required=True, help="NAME=PATH.npy")
    p.add_argument("--remote", required=True)
    p.add_argument("--staging", type=Path, required=True)
    p.add_argument("--size-limit", type=int, required=True)
    r = sub.add_parser("read")
    r.add_argument("--remote", required=True)
    r.add_argument("--local", type=Path, required=True, help="an empty folder: the cold local cache")
    r.add_argument("--weights", required=True, help="NAME=W,NAME=W")
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--batch", type=int, required=True)
    a = parser.parse_args()
    if a.command == "prepare":
        prepare(dict((k, Path(v)) for k, v in (w.split("=", 1) for w in a.windows)), a.remote, a.staging,
                a.size_limit)
    else:
        weights = {k: float(v) for k, v in (w.split("=", 1) for w in a.weights.split(","))}
        print(json.dumps(read(a.remote, a.local, weights, a.steps, a.batch)))


if __name__ == "__main__":
    main()
