"""Several processes (torchrun, DDP): the process group, agreement on when an epoch ends, gradient
all-reduce once a step, and every rank's RNG state in the checkpoint."""
from __future__ import annotations

import gc
import logging
import os
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from vlp_train import checkpoint

log = logging.getLogger(__name__)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    control_group: object = None  # a gloo group: host-side agreement without a device sync
    timeout_s: int = 1800
    end_group: object = None  # a gloo group with END_OF_RUN_WAIT_S as its timeout: see leave_together

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str, timeout_s: int = 1800) -> Distributed:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process otherwise. Every collective gives up
    after `timeout_s` (run.dist_timeout_s) instead of waiting for ever on a rank that died or hangs;
    the host-side ones are preceded by `all_arrive`, whose error names the missing ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    from datetime import timedelta

    import torch.distributed as dist
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():  # else a second train() in this process (tests, notebooks): the same group
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if device_type == "cuda" else None  # None: the default (gloo) group
    end = end_group(timeout_s)
    dist_info = Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), control,
                            timeout_s, end)
    _handed_out[:] = [ref for ref in _handed_out if ref() is not None] + [weakref.ref(dist_info)]
    return dist_info


# What this module holds must never keep a process group alive past its destruction: a group's gloo
# worker threads stop only when its last reference goes (torch's destroy_process_group unregisters it,
# it does not stop them), and a thread still finishing a collective (releasing the Python tensors it
# held, under the GIL) once the interpreter exits aborts the process (see shut_down).
_end_group: tuple | None = None  # (a weak reference to the default group, its end group)
_handed_out: list = []  # weak references to the Distributed objects setup_distributed made: shut_down takes their groups


def end_group(timeout_s: int):
    """The gloo group `leave_together` waits on: a group's timeout bounds every wait on it, a
    barrier's sends too, so the end of a run gets a group of its own (END_OF_RUN_WAIT_S). Made once
    per default group, right after it: a process that trains several times (VLMo's stages) reuses
    it, so only the first `setup_distributed` makes a group (whose creation waits for every rank
    with this long timeout only then, when the default group's creation just met them all)."""
    from datetime import timedelta

    import torch.distributed as dist
    global _end_group
    world = dist.group.WORLD
    if _end_group is None or _end_group[0]() is not world:  # (a destroyed default group's end group is gone with it)
        _end_group = (weakref.ref(world), dist.new_group(
            backend="gloo", timeout=timedelta(seconds=max(timeout_s, END_OF_RUN_WAIT_S))))
    return _end_group[1]


def all_arrive(dist_info: Distributed, at: str) -> None:
    """A barrier that names the ranks that did not arrive within run.dist_timeout_s (gloo's
    monitored barrier), before the host-side collectives of a step: a rank that died or hangs is
    named in the error, instead of every other rank waiting with no clue which one it is."""
    from datetime import timedelta

    import torch.distributed as dist
    try:
        dist.monitored_barrier(group=dist_info.control_group, timeout=timedelta(seconds=dist_info.timeout_s),
                               wait_all_ranks=True)
    except RuntimeError as err:
        raise RuntimeError(f"rank {dist_info.rank}, {at}: {str(err).splitlines()[0]}") from err


def main_rank_decides(dist_info: Distributed | None, at: str, decide):
    """decide() on the main rank alone, its result on every rank (through the CPU group): what the
    ranks must agree on (which examples a split keeps, hence the steps of an epoch) is then the same
    by construction, and the work is done once. An error of the main rank's decide() stops every
    rank: the main rank raises it, the others a RuntimeError carrying its message (instead of
    waiting for a result until run.dist_timeout_s). The others wait for it as for any host-side
    collective, up to run.dist_timeout_s (all_arrive names rank 0 past it): meant for work well
    inside that (the image files' check: ~40 s for COCO's 123k images against the default 1,800 s).
    One process (`dist_info` None or world 1): decide()."""
    if dist_info is None or dist_info.world == 1:
        return decide()
    import torch.distributed as dist
    payload, error = [None], None
    if dist_info.main:
        try:
            payload = [("done", decide())]
        except Exception as err:  # sent on, so that every rank stops with it
            error, payload = err, [("failed", f"{type(err).__name__}: {err}")]
    all_arrive(dist_info, at)
    dist.broadcast_object_list(payload, src=0, group=dist_info.control_group)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "failed":
        raise RuntimeError(f"rank {dist_info.rank}, {at}: the main rank failed: {value}")
    return value


END_OF_RUN_WAIT_S = 24 * 3600


def leave_together(dist_info: Distributed) -> None:
    """Every rank leaves a run when the main rank has done its last evaluation and writes: a rank
    that finished its steps waits here instead of tearing down its side of the group while the
    main rank still works (the ranks then exit, and report success, together). The wait is on the
    end group, bounded by END_OF_RUN_WAIT_S rather than run.dist_timeout_s: the main rank's last
    evaluation (a whole held-out split, with ITM re-ranking) and export may take longer than a
    step's collectives ever should, and a rank that fails meanwhile is one torchrun stops the
    others for anyway."""
    if dist_info.world == 1:
        return
    import torch.distributed as dist
    try:
        dist.barrier(group=dist_info.end_group)
    except RuntimeError as err:
        raise RuntimeError(f"rank {dist_info.rank}, waiting for the main rank's last evaluation and export: "
                           f"{str(err).splitlines()[0]}") from err


def shut_down() -> None:
    """End the process group once a process's runs are done (the CLI's last act, after every stage,
    on success and on error alike): destroy it and let go of every group this module handed out,
    so that their gloo worker threads are joined now, while the interpreter is whole. A worker may
    still be releasing the tensors of a collective that just completed (the broadcast of the main
    rank's decision, say), which takes the GIL: past the start of the interpreter's exit that
    thread is ended inside a C++ destructor and the process aborts (SIGABRT, "terminate called
    without an active exception"), and torchrun reports a failed rank, on a run that succeeded or
    after the error it should have reported alone. The Distributed objects made by
    setup_distributed drop their groups here: one still referenced (by a failed command's
    traceback) would otherwise keep its groups, and their threads, alive into the exit. (A
    DistributedDataParallel model leaves references to the default group that torch never
    releases: that group's threads live on into the exit, which is safe once they are idle; on a
    run's success path its last collective precedes `leave_together`'s wait for the main rank's
    last evaluation and export, so they are long idle by then.)"""
    global _end_group
    import sys
    dist = sys.modules.get("torch.distributed")  # not imported: no group (and no torch import for this)
    had_groups = _end_group is not None or bool(_handed_out)  # none in one process (world 1): nothing to end
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        had_groups = True
    _end_group = None
    for ref in _handed_out:
        dist_info = ref()
        if dist_info is not None:
            dist_info.control_group = dist_info.end_group = None
    _handed_out.clear()
    if had_groups:
        gc.collect()  # a group held in a reference cycle goes now too, not at the interpreter's exit


def wrap(step_module: nn.Module, dist_info: Distributed, device: torch.device) -> nn.Module:
    if dist_info.world == 1:
        return step_module
    return nn.parallel.DistributedDataParallel(
        step_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def accumulating(step_module, completes_step: bool):
    """Under DDP, a micro-batch that does not complete an optimizer step keeps its gradients
    local (`no_sync`): they are all-reduced once, summed, with the step's last micro-batch,
    instead of once per micro-batch (optim.grad_accum all-reduces of every gradient a step)."""
    if completes_step or not isinstance(step_module, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return step_module.no_sync()


def synchronised(loader, dist_info: Distributed):
    """Batches; under DDP every rank stops the epoch when any rank runs out (no hang). The flag
    goes through a CPU (gloo) group: a CUDA tensor and `.item()` here would sync every step."""
    if dist_info.world == 1:
        yield from loader
        return
    import torch.distributed as dist
    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        all_arrive(dist_info, "before the next batch")
        flag = torch.tensor([0 if batch is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=dist_info.control_group)
        if flag.item() == 0:
            return
        yield batch


def rank_rng_states(dist_info: Distributed) -> list[dict]:
    """Every rank's RNG state, by rank: each rank draws its own dropout masks (seed + rank), and
    after a resume must go on drawing its own, not rank 0's. Through the CPU (gloo) group."""
    if dist_info.world == 1:
        return [checkpoint.rng_state()]
    import torch.distributed as dist
    states = [None] * dist_info.world
    all_arrive(dist_info, "saving a checkpoint")
    dist.all_gather_object(states, checkpoint.rng_state(), group=dist_info.control_group)
    return states


def restore_rng(state: dict, dist_info: Distributed) -> None:
    rng = checkpoint.rng_of_rank(state, dist_info.rank)
    if rng is None:
        log.warning("the checkpoint holds no RNG state of rank %d (saved by fewer ranks): it keeps its fresh seed",
                    dist_info.rank)
        return
    checkpoint.set_rng_state(rng)
