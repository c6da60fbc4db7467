"""Under DDP every rank stops an epoch together when one runs out of batches (gloo, two processes)."""
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from vlp_train.train import Distributed, _synchronised


def _rank(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        control = dist.new_group(backend="gloo")
        batches = [f"r{rank}b{i}" for i in range(3 if rank == 0 else 2)]  # rank 1 runs out first
        results[rank] = list(_synchronised(iter(batches), Distributed(rank, 2, rank, control)))
    finally:
        dist.destroy_process_group()


def test_ranks_stop_together_when_one_runs_out():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(port, results), nprocs=2, join=True)
        assert dict(results) == {0: ["r0b0", "r0b1"], 1: ["r1b0", "r1b1"]}
