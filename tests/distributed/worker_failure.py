"""A rank raising inside the gather: the other rank must fail with a clear error, in bounded time.

Started as two plain processes (RANK/WORLD_SIZE/MASTER_* in the environment,
no launcher that would kill the survivor), FSDP2 on the tiny model. Rank 1
raises inside its gather of `model.layers.1`, before reaching the collective,
so rank 0 sits in `full_tensor()`'s all-gather: the hardest case (see
`rlsync/source/lockstep.py`, limitation 1). Each rank writes what it raised to
$RLSYNC_TEST_OUT/rank{r}.err and exits 1.

    python tests/distributed/worker_failure.py TIED_PATH TIMEOUT_S
"""

import os
import sys
import time
import traceback

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rlsync.source import FSDP2Source  # noqa: E402
from tests.distributed.common import decoder_layers, load_model, train_step  # noqa: E402


class InjectedFailure(RuntimeError):
    pass


def main() -> None:
    path, timeout_s = sys.argv[1], float(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from torch.distributed.fsdp import fully_shard

    model = load_model(path)
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optimizer, seed=1)

    source = FSDP2Source(model, timeout_s=timeout_s)
    if rank == 1:
        real_gather = source._gather

        def gather(entries):
            if entries[0].raw.startswith("model.layers.1."):
                raise InjectedFailure("injected failure inside the gather")
            return real_gather(entries)

        source._gather = gather
    start = time.monotonic()
    try:
        source.drain()
    except BaseException as exc:
        elapsed = time.monotonic() - start
        with open(os.path.join(os.environ["RLSYNC_TEST_OUT"], f"rank{rank}.err"), "w") as f:
            f.write(f"{elapsed:.2f}\n{type(exc).__name__}: {exc}\n")
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # skip interpreter teardown of a broken process group
    print(f"rank {rank}: sync finished without error", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
