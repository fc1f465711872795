"""Run a test function in N gloo processes on CPU, with a free port and a hard time limit.

Each worker is `fn(rank, world_size, *args)`, called after `torch.distributed` is initialised; an
exception in any worker fails the test with the worker's traceback, and a worker that hangs past
`timeout` is killed and fails it too (a hung collective must not hang CI).
"""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: How close a distributed run must come to the same training on one process, both run in float64. The two
#: add the same numbers in another order (per-rank partial sums, then an all-reduce; other GEMM blocking).
#: In fp32 that alone moves the adapters after two SGD steps at lr=0.5 by up to 1.2e-5 on one CPU and 2.9e-5
#: on another, so no fp32 tolerance is both safe and tight. In fp64 the same reordering moves them by about
#: 3e-14 here; 1e-9 is far above that and far below any real fault (a missing, doubled or
#: misscaled reduction moves them by 1e-3 or more).
FP64_TOLERANCE = {"rtol": 1e-9, "atol": 1e-9}

#: Per-collective limit inside the workers, so a missing peer raises instead of waiting 30 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=90)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, interpret, fn, args):
    # Same kernel path as the parent: interpreted Triton on CPU unless the parent has a GPU.
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        if interpret:
            from lorafuse import kernels
            from lorafuse.dispatch import select_backend

            assert select_backend(torch.empty(0)) is kernels, "workers must run the interpreted Triton kernels"
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_workers(fn, world_size, *args, timeout=180):
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes; fail on error or timeout."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    context = mp.start_processes(_entry, args=(world_size, free_port(), interpret, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(5)
            pytest.fail(f"{fn.__name__} with {world_size} processes did not finish within {timeout} s")


def mean_over_ranks(tensor):
    """The mean of `tensor` over all ranks (tensor-parallel ranks hold the same loss, so on a dp x tp
    mesh this is the mean over the dp ranks)."""
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size()
