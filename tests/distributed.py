"""Two gloo processes on 127.0.0.1 for the distributed tests, and the functions they run.

The functions live here (not in a test module) so that spawned processes can import them.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def run_on_two_ranks(function: Callable[..., Any], out: Path, *args: Any, timeout: float = 90.0) -> list[Any]:
    """Run ``function(rank, *args)`` in 2 gloo processes; return what each rank returned."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(_entry, args=(function, port, str(out), args), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{function.__name__} did not finish on {WORLD} ranks within {timeout} s")
    except mp.ProcessExitedException:
        # gloo's threads now and then abort a process as it shuts down ("terminate called without an active
        # exception") after its work is saved: the results stand; a crash before that still fails
        if not all((Path(out) / f"rank{rank}.done").exists() for rank in range(WORLD)):
            raise
    return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _entry(rank: int, function: Callable[..., Any], port: int, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(function(rank, *args), Path(out) / f"rank{rank}.pt")
        (Path(out) / f"rank{rank}.done").touch()  # written whole: the process's work is done
    finally:
        dist.destroy_process_group()


def fsdp_gradients(rank: int, order: str, make_batch: Callable[[], tuple]) -> dict[str, Any]:
    """Per-block ``fully_shard`` before or after ``convert``; one training step on the same batch on
    both ranks (fixed γ): the full gradient of every parameter, and how the block parameters are held."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import bdia_fx

    from models import gpt2

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = gpt2(3, dropout=0.0)
    ids = make_batch()
    config = bdia_fx.BDIAConfig(gammas=(0.5,))
    if order == "shard-after-convert":
        conv = bdia_fx.convert(model, (ids,), {"use_cache": False}, config)
        for block in conv.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(conv, mesh=mesh)
    else:
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        conv = bdia_fx.convert(model, (ids,), {"use_cache": False}, config)
    conv.train()
    conv(ids, labels=ids).loss.backward()
    block_params = dict(conv.transformer.h[1].named_parameters())
    return {
        "grads": {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                  for n, p in conv.named_parameters()},
        "block_params_sharded": all(isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0]
                                    for p in block_params.values() if p.dim() > 0),
    }


def ddp_gammas_and_gradients(rank: int, make_batch: Callable[[], tuple]) -> dict[str, Any]:
    """DDP: from the same global seed each rank draws its own γ; with γ fixed, gradients average to
    the single-process gradient of the whole batch (each rank takes half of it)."""
    from torch.nn.parallel import DistributedDataParallel

    import bdia_fx
    from bdia_fx.converted import observing

    from cases import FramesSeen
    from models import TinyGPT

    torch.manual_seed(0)
    ids = make_batch()
    half = ids[rank::WORLD]
    drawn = bdia_fx.convert(TinyGPT(layers=3), (half,)).train()
    torch.manual_seed(1)  # the same global seed on both ranks
    with observing(drawn, FramesSeen()) as seen:
        drawn(half)
    call = seen.frames[0]
    signs = torch.cat([call.sign(k).flatten() for k in range(1, len(call.steps))])
    torch.manual_seed(0)
    model = TinyGPT(layers=3)
    ddp = DistributedDataParallel(bdia_fx.convert(model, (half,), config=bdia_fx.BDIAConfig(gammas=(0.5,))))
    ddp.train()
    ddp(half).pow(2).mean().backward()
    return {"seed": int(call.seed), "signs": signs, "grads": {n: p.grad for n, p in model.named_parameters()}}


def fsdp_mixed_precision(rank: int, make_batch: Callable[[], tuple]) -> dict[str, Any]:
    """Per-block ``fully_shard`` with bfloat16 compute (``MixedPrecisionPolicy``: the stream is
    bfloat16, the chain's codes int32): reversible and stored gradients, each from one training step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import bdia_fx

    from models import gpt2

    mesh = init_device_mesh("cpu", (WORLD,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    ids = make_batch()
    grads = {}
    for mode in ("reversible", "stored"):
        torch.manual_seed(0)
        conv = bdia_fx.convert(gpt2(3, dropout=0.0), (ids,), {"use_cache": False},
                               bdia_fx.BDIAConfig(gammas=(0.5,), mode=mode))
        for block in conv.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(conv, mesh=mesh, mp_policy=policy)
        conv.train()(ids, labels=ids).loss.backward()
        grads[mode] = [p.grad.full_tensor() for p in conv.parameters()]
    return grads


def fsdp_memory_budget(rank: int, make_batch: Callable[[], tuple]) -> dict[str, Any]:
    """A per-block sharded model converted with a memory budget (per rank: the probes run the sharded steps,
    their collectives included): the plan, the step's measured peak on this rank, and its gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import bdia_fx
    from bdia_fx.memory import default_loss
    from bdia_fx.peak import measure_step, preserved_training_state

    from models import gpt2

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = gpt2(4, 64, dropout=0.0)
    ids = make_batch()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    config = bdia_fx.BDIAConfig(gammas=(0.5,))
    kwargs = {"labels": ids, "use_cache": False}
    full = bdia_fx.report_of(bdia_fx.convert(model, (ids,), kwargs, config, memory_budget=1.0)).memory_plan
    budget = (full.smallest_peak + full.plain_peak) // 2
    conv = bdia_fx.convert(model, (ids,), kwargs, config, memory_budget=budget)
    plan = bdia_fx.report_of(conv).memory_plan
    with preserved_training_state(conv):
        conv.train()
        measured = [measure_step(conv, lambda: default_loss(conv(ids, **kwargs)), torch.device("cpu")).peak
                    for _ in range(3)]  # gloo frees some buffers asynchronously: peaks vary a little
    conv(ids, **kwargs).loss.backward()
    return {"budget": budget, "kept": plan.kept, "peak": plan.peak, "measured": measured,
            "grads": {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                      for n, p in conv.named_parameters()}}
