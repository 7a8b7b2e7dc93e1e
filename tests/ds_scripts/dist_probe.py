"""Discovery probe: find my rank with roberta_ds.dist, build the gloo world on CPU, all_reduce, report.

Run it under any launcher; every rank prints one line the tests parse:
    DIST_PROBE rank=1 world=2 host=vm local_rank=1 local_world=2 source=slurm master=vm:21234 allreduce=3.0 ok=1

    srun -n 2 python tests/ds_scripts/dist_probe.py
    srun --mpi=pmix -n 2 python tests/ds_scripts/dist_probe.py
    mpirun --allow-run-as-root --oversubscribe -np 2 python tests/ds_scripts/dist_probe.py
    torchrun --nproc_per_node 2 tests/ds_scripts/dist_probe.py --deepspeed

--deepspeed initialises through `deepspeed.init_distributed(auto_mpi_discovery=False)` (what the
trainer does) instead of `torch.distributed.init_process_group("env://")`. The world built is checked
against what the launcher promised (`expected_world_size`, read before `export_env`); a mismatch or a
contradictory environment exits 1 with the ConfigError's message.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from roberta_ds.errors import ConfigError
from roberta_ds.launch import dist


def emit(line: str) -> None:
    """One write(2) per line: ranks share the launcher's stdout pipe, and print() may split a line
    into two writes (text, then end) when stdout is unbuffered, interleaving ranks mid-line."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dist_probe.py")
    ap.add_argument("--deepspeed", action="store_true", help="init via deepspeed.init_distributed")
    ap.add_argument("--no-mpi", action="store_true", help="discover(use_mpi=False)")
    # The deepspeed launcher appends --local_rank=N; discovery reads LOCAL_RANK from the env instead.
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)

    try:
        expected = dist.expected_world_size()   # before export_env rewrites WORLD_SIZE
        env = dist.discover(use_mpi=not args.no_mpi)
    except ConfigError as e:
        emit(f"DIST_PROBE_ERROR {e}")
        return 1
    dist.export_env(env)

    import torch
    import torch.distributed as tdist

    if args.deepspeed:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        from roberta_ds.engine.runtime import release_shm_buffers

        release_shm_buffers(env.rank)  # DeepSpeed's CPU comm op never unlinks its /dev/shm buffers
    else:
        tdist.init_process_group("gloo", init_method="env://")
    try:
        try:
            dist.check_world(env, tdist.get_world_size(), expected)
        except ConfigError as e:
            emit(f"DIST_PROBE_ERROR rank={env.rank} {e}")
            return 1
        x = torch.tensor([float(env.rank + 1)])
        tdist.all_reduce(x)             # 1 + 2 + ... + world
        want = env.world_size * (env.world_size + 1) / 2
        ok = tdist.get_rank() == env.rank and x.item() == want
        emit(f"DIST_PROBE rank={tdist.get_rank()} world={tdist.get_world_size()} host={socket.gethostname()} "
             f"local_rank={env.local_rank} local_world={env.local_world_size} source={env.source} "
             f"master={env.master_addr}:{env.master_port} allreduce={x.item()} ok={int(ok)}")
        dist.print0(f"DIST_PROBE_RANK0 {dist.log_source(env)}", env=env)
        tdist.barrier()
        return 0 if ok else 1
    finally:
        # Without an explicit teardown gloo can abort the interpreter at exit (exit 134).
        tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
