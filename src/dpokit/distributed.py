"""Multi-process training on torch.distributed: DDP or FSDP2 (`fully_shard`), launched by torchrun.

Nothing here is home-made distribution: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR, the process
group is gloo on CPU and NCCL on GPUs, gradients are averaged by DDP or FSDP2. What this module adds is the
bookkeeping around them, so the loop reads the same with one process or many:

- `Distributed`: who am I (rank, world size, the device to use); a one-process run is world size 1 and
  every helper below then does nothing extra.
- `map_batches`: each rank computes every world-th batch (same batch boundaries as one process, so the
  numbers are identical) and all ranks receive the merged, ordered result — the reference log-prob cache
  and held-out evaluations are computed in parallel this way.
- `sum_across` / `any_across` / `all_sum`: metric sums, stop requests and tensors reduced over ranks.
- `wrap`: the policy inside DDP or FSDP2, with forward = completion log-probs (their hooks run on forward).
- `full_model_state` / `full_optimizer_state`: whole tensors gathered for saving on rank 0.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


def wants_cuda(requested: str) -> bool:
    """--device asks for a GPU: 'cuda…', or 'auto' where one is present."""
    return requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())


class DistributedError(RuntimeError):
    """A multi-process set-up that cannot work, reported before any work starts."""


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False
    owns_group: bool = False  # this run created the process group, so it destroys it at the end

    @property
    def enabled(self) -> bool:
        return self.world > 1 or self.fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """The device of this process: cuda:LOCAL_RANK on GPUs (one process per GPU), else the CPU."""
        if not wants_cuda(requested):
            return torch.device(requested if requested != "auto" else "cpu")
        if self.enabled:
            if requested not in ("auto", "cuda"):
                raise DistributedError(f"--device {requested}: under torchrun each process takes the GPU of its "
                                       "LOCAL_RANK; use --device cuda (or auto) and CUDA_VISIBLE_DEVICES to choose")
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(requested if requested != "auto" else "cuda")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def check_launch(losses: list[str]) -> None:
    """Refuse what cannot run over several processes before any of them waits on another. The process
    count: a process group the caller made, else torchrun's WORLD_SIZE.

    AOT sorts the log-ratios of the whole micro-batch (online DPO: of its pairs); split over processes, each
    would sort only its own rows — another loss. (Gathering them with autograd, torch.distributed.nn.all_gather,
    would also need the sorted terms shared out so none counts twice: not done.)"""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else \
        int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    coupled = [n for n in losses if n in ("aot", "aot_unpaired")]
    if coupled:
        raise DistributedError(f"loss {','.join(coupled)} sorts the log-ratios of the whole micro-batch, which "
                               "torchrun splits over processes: launch it without torchrun")


def start(fsdp: bool = False, requested_device: str = "auto") -> Distributed:
    """Join the process group torchrun describes in the environment (or one the caller created).

    Without torchrun (no WORLD_SIZE) this is a one-process run; --fsdp then has nothing to shard over."""
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), fsdp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if fsdp:
            raise DistributedError("--fsdp shards the model over processes: launch at least 2 with torchrun, e.g. "
                                   "torchrun --nproc-per-node 2 -m dpokit train --fsdp …")
        return Distributed()
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise DistributedError(f"WORLD_SIZE={world} but {key} is not set: launch with torchrun, which sets "
                                   "RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process")
    on_gpu = wants_cuda(requested_device)
    backend = "nccl" if on_gpu else "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, fsdp, owns_group=True)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return type(value)(**{k: _to_cpu(getattr(value, k)) for k in value.__dataclass_fields__})
    return value


def map_batches(compute, n_batches: int, ctx: Distributed | None, lockstep: bool = False) -> list:
    """[compute(i) for i in range(n_batches)], the work split round-robin over ranks; every rank gets all.

    lockstep: every rank makes the same number of calls (needed when compute runs collectives, as an
    FSDP-sharded model's forward does); a rank out of batches repeats batch 0 and drops the result."""
    if ctx is None or not ctx.enabled:
        return [compute(i) for i in range(n_batches)]
    mine = {}
    for j in range(math.ceil(n_batches / ctx.world)):
        i = j * ctx.world + ctx.rank
        if i < n_batches:
            mine[i] = _to_cpu(compute(i))
        elif lockstep:
            compute(0)
    gathered: list = [None] * ctx.world
    dist.all_gather_object(gathered, mine)
    merged = {i: v for part in gathered for i, v in part.items()}
    return [merged[i] for i in range(n_batches)]


def _comm_device() -> torch.device:
    """Where collective tensors must live: NCCL reduces only CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across(values: dict[str, float], ctx: Distributed) -> dict[str, float]:
    """Each key summed over ranks (float64, so sums of many small numbers stay exact enough)."""
    if not ctx.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_sum(tensor: torch.Tensor, ctx: Distributed) -> torch.Tensor:
    """The tensor summed elementwise over ranks (same shape everywhere), on this tensor's device."""
    if not ctx.enabled:
        return tensor
    t = tensor.detach().to(_comm_device())
    dist.all_reduce(t)
    return t.to(tensor.device)


def gather_cat(tensor: torch.Tensor, ctx: Distributed) -> torch.Tensor:
    """The 1-D tensors of every rank (lengths may differ), concatenated in rank order, on this tensor's device."""
    if not ctx.enabled:
        return tensor
    parts: list = [None] * ctx.world
    dist.all_gather_object(parts, tensor.detach().cpu())
    return torch.cat(parts).to(tensor.device)


def gather_objects(value, ctx: Distributed) -> list:
    """[rank 0's value, rank 1's, …] on every rank (small picklable values: RNG states)."""
    if not ctx.enabled:
        return [value]
    parts: list = [None] * ctx.world
    dist.all_gather_object(parts, value)
    return parts


def any_across(flag: bool, ctx: Distributed) -> bool:
    """True on every rank when it is true on any (a SIGTERM may reach the ranks a step apart)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(value, ctx: Distributed):
    """Rank 0's value on every rank."""
    if not ctx.enabled:
        return value
    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(module, ctx: Distributed):
    """The module training calls (logprobs.sequence.TokenLogpsModule: the policy is its `.lm`), wrapped: DDP,
    or FSDP2 with each decoder layer its own shard unit."""
    policy = module.lm
    if ctx.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 kept FSDP2 under its private name
            from torch.distributed._composable.fsdp import fully_shard
        layers = _decoder_layers(policy)
        for layer in layers:
            fully_shard(layer)
        return fully_shard(module)  # the root: embeddings, final norm, LM head (tied or not)
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [ctx.local_rank] if next(policy.parameters()).is_cuda else None
    # Buffer sync off: the only buffers are constant (rotary frequencies), and syncing them would make every
    # forward a collective, so evaluation could not be split unevenly across ranks. (torch 2.13 renamed
    # broadcast_buffers to forward_sync_buffers; older versions know only the first.)
    import inspect
    off = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
           else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=device_ids, **{off: False})


def _decoder_layers(policy):
    decoder = policy.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise DistributedError(f"--fsdp: cannot find the decoder layers of {type(policy).__name__} "
                               "(expected model.layers or transformer.h)")
    return list(layers)


@contextmanager
def gradient_sync(trained, ctx: Distributed, sync: bool):
    """Gradients are reduced across ranks only on the last micro-batch of a step (grad accumulation)."""
    if ctx.fsdp:
        trained.set_requires_gradient_sync(sync)
        yield
    elif ctx.enabled and not sync:
        with trained.no_sync():
            yield
    else:
        yield


def full_model_state(trained, ctx: Distributed) -> dict | None:
    """Whole (unsharded) weights on CPU for saving: None means the policy's own state dict is whole."""
    if not ctx.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (embeddings = LM head) come back as separate copies; make them one tensor again so
    # save_pretrained stores it once, exactly as a one-process run does.
    first_name: dict[int, str] = {}
    for name, param in trained.state_dict(keep_vars=True).items():
        first = first_name.setdefault(id(param), name)
        if first != name and name in state:
            state[name] = state[first]
    return {k.removeprefix("lm."): v for k, v in state.items()}


def full_optimizer_state(trained, optimizer, ctx: Distributed) -> dict:
    if not ctx.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(trained, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(trained, optimizer, state: dict, ctx: Distributed) -> None:
    if not ctx.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(trained, optimizer, state, options=StateDictOptions(full_state_dict=True))


def grad_norm_value(norm) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP2)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)



def training_state_bytes(model, optimizer) -> tuple[int, int]:
    """(weight bytes, optimizer-state bytes) this process holds: its shards under FSDP2, everything under DDP."""
    def local(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    weights = sum(local(p) for p in model.parameters())
    moments = sum(local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return weights, moments
