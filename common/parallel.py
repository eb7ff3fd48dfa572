"""Scale-out for train.py with PyTorch's own engine: torchrun's environment, DDP or FSDP2,
activation checkpointing, torch.compile, and sharded checkpoints with torch.distributed.checkpoint.

    torchrun --nproc_per_node 8 train.py --size 2b ...            # one node, FSDP2 (the default for 0.6b/2b)
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-endpoint HOST:29500 train.py --size 2b ...
    torchrun --nproc_per_node 2 train.py --size small --parallel ddp   # DDP (default for the small presets)

Without torchrun (no RANK in the environment) everything here is a no-op: one process, no
process group, the plain model.
"""
from __future__ import annotations

import io
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from common import files


@dataclass
class Dist:
    """Where this process sits: rank, world size, local rank and its device."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 or dist.is_initialized()


def init_distributed() -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group; without them, a
    single process on the best device. On GPUs the group has two backends: NCCL for CUDA tensors
    (gradients, FSDP2's shards) and gloo for the few small CPU tensors the run agrees on (a stop
    signal, finite weights, per-stage counts), which NCCL alone refuses."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return Dist(rank, world, local, device)


def use_tf32():
    """On CUDA, TF32 for the matrix products that stay in float32 (BridgeFlow pre-training, the
    VAE, training-time sample grids of the fp32 EMA): about 8x the fp32 rate, 10-bit mantissas."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def sampling_dtype(device) -> torch.dtype:
    """The weights' dtype for sampling: bf16 on CUDA (no autocast recasting fp32 weights at every
    step), float32 on a CPU (where bf16 matrix products are slower without AMX)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def synchronize(device):
    """Wait for the device's queued work, so that a clock read after it measures that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def default_strategy(preset: str) -> str:
    """FSDP2 where the model is too large to replicate comfortably, DDP for the small presets."""
    return "fsdp" if preset in ("0.6b", "2b", "flux1-dev") else "ddp"


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks (itself when there is one process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def any_rank(flag: bool) -> bool:
    """True on every rank when the flag is true on at least one (a stop signal, a non-finite
    weight): all ranks then take the same branch and issue the same collectives."""
    return all_sum(torch.tensor(float(flag))).item() > 0


def broadcast_module(module: nn.Module, src: int = 0):
    """Rank src's parameters and buffers on every rank (BridgeFlow after its pre-training)."""
    if dist.is_initialized():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


# ----------------------------------------------------------------------------------------------
# Splitting a global batch: micro-batches per rank, each stage's share of the global mean
# ----------------------------------------------------------------------------------------------


def micro_batches(batch_size: int, micro: int, world: int, rank: int) -> list[list[int]]:
    """Which samples of a global batch this rank computes, one list per accumulation step: sample i
    of the batch belongs to micro-batch i mod R (R = ranks · accumulation steps, strided so that
    every micro-batch draws from the whole batch), and rank r computes micro-batches r, r+W, …"""
    R = batch_size // micro
    return [list(range(j * world + rank, batch_size, R)) for j in range(R // world)]


def window_rows(stages: list, k: int) -> tuple[list, int]:
    """The samples of a micro-batch at stage k (stages: each sample's stage) and their number n, for a stage that the
    global batch holds. A micro-batch without one runs the stage on its first sample with n = 0 (weight 0): every rank
    then runs every stage of the global batch, so the same blocks and the same collectives, as FSDP2 requires."""
    rows = [i for i, s in enumerate(stages) if s == k]
    return (rows, len(rows)) if rows else ([0], 0)


def share_of_global_mean(loss_sum: torch.Tensor, total: float) -> torch.Tensor:
    """A micro-batch's part of a stage's mean over the global batch (loss_sum: the sum of its
    samples' losses; total: the stage's samples in the global batch), scaled by the number of
    ranks because DDP and FSDP2 average gradients over ranks: summed over micro-batches and
    averaged over ranks, the gradients are those of the global mean."""
    return loss_sum / total * (dist.get_world_size() if dist.is_initialized() else 1)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a total norm of max_norm; the norm before clipping, as a plain
    tensor (FSDP2 returns a DTensor)."""
    return full(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


# ----------------------------------------------------------------------------------------------
# Wrapping: DDP replicates the whole loss module; FSDP2 shards each transformer block, then the root
# ----------------------------------------------------------------------------------------------


def shard_model(model: nn.Module, bf16: bool):
    """FSDP2: fully_shard every double and single block, then the root (embedders and head), with
    bf16 compute and fp32 gradient reduction when bf16 is on (master weights stay fp32). Inputs
    are not cast by FSDP2: the model casts its own (nami.Nami.forward), so that τ reaches the time
    embedding in float32 and RoPE's angles stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # Stages stop after different single blocks. Every rank runs every stage of the global batch
    # (window_rows), so every rank runs the same blocks and issues the same collectives; a block
    # no stage of the batch reaches gets no gradient anywhere and, as in one process, AdamW
    # leaves it alone (FSDP2's set_reduce_scatter_unused_params would give it zeros to move on).
    return model


def fill_shard(param: torch.Tensor, value: torch.Tensor):
    """Copy a parameter's whole value into it: into this rank's part of an FSDP2 DTensor (dim 0,
    split as fully_shard splits it), or into the plain tensor."""
    if hasattr(param, "to_local"):
        mesh = param.device_mesh
        pieces = torch.chunk(value, mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        value, param = (pieces[rank] if rank < len(pieces) else value[:0]), param.to_local()
    param.copy_(value)


def wrap_ddp(loss_module: nn.Module, device: torch.device):
    """DDP around the module whose one forward runs all stages of a step (several forwards of the
    model per backward are fine for DDP only inside one wrapped forward). Stages use different
    numbers of blocks, hence find_unused_parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=True)


def set_gradient_sync(wrapped: nn.Module, model: nn.Module, sync: bool):
    """Gradient accumulation without communication on all but the last micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):   # FSDP2
        model.set_requires_gradient_sync(sync)
    elif hasattr(wrapped, "require_backward_grad_sync"):  # DDP (what its no_sync() context sets)
        wrapped.require_backward_grad_sync = sync


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (e.g. FSDP2's gradient norm), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------------------------
# Memory and speed: activation checkpointing and torch.compile, per block
# ----------------------------------------------------------------------------------------------


def compile_blocks(model: nn.Module):
    """torch.compile each block (as torchtitan does): one graph per stage resolution, whatever the
    batch size (the model marks it dynamic), reused every step; the stage loop stays eager."""
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for block in blocks:
            block.compile(dynamic=False)
    model.compiled = True


# ----------------------------------------------------------------------------------------------
# Checkpoints: sharded with torch.distributed.checkpoint (resumable on any number of ranks)
# ----------------------------------------------------------------------------------------------


def save_sharded(folder, model, ema, opt):
    """Every rank writes its shards of model, EMA and optimizer state into `folder`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
             "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder, model, ema, opt):
    """Read a DCP checkpoint into this run's model, EMA and optimizer, whatever the number of
    ranks that wrote it or reads it now (also a single process without a process group). Through
    the restricted reader and planner below: nothing in the folder can run code."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    state = {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
             "optim": get_optimizer_state_dict(model, opt)}
    reader = restricted_reader(folder)
    reader.read_metadata()  # a refusal here is raised on every rank as it is
    try:
        dcp.load(state, storage_reader=reader, planner=restricted_planner())
    except dcp.api.CheckpointException as e:  # what a rank raised inside, wrapped with its stack
        refusals = [error for error, _ in e.failures.values() if isinstance(error, ValueError)]
        if refusals:
            raise refusals[0] from None
        raise
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, opt, state["optim"])


# What a DCP checkpoint's .metadata is made of (torch 2.6 to 2.13): its dataclasses, and the
# torch.Size, dtypes, layout and paths inside them
DCP_METADATA_CLASSES = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only DCP_METADATA_CLASSES and torch dtypes. torch's
    FileSystemReader unpickles .metadata with plain pickle, which runs whatever a crafted file
    names (exec, os.system)."""

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in DCP_METADATA_CLASSES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a DCP checkpoint's metadata never holds")


def restricted_reader(folder):
    """A torch.distributed.checkpoint FileSystemReader whose .metadata is read by MetadataUnpickler
    and must name only shard files inside the folder. (Its tensors are read with
    torch.load(weights_only=True) by torch itself, safe from torch 2.6 on.)"""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class RestrictedReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # torch >= 2.7 passes rank=None: one .metadata
            path = Path(self.path) / ".metadata"
            try:
                with files.open_regular(path) as f:
                    metadata = MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
                raise ValueError(f"{path} was refused ({e}): restricted unpickling, nothing in it was run")
            shards = {getattr(info, "relative_path", None) for info in getattr(metadata, "storage_data", {}).values()}
            if not isinstance(metadata, Metadata) or not all(files.plain_name(name) for name in shards):
                raise ValueError(f"{path} is not the metadata of a DCP checkpoint, or names shard files outside "
                                 f"{path.parent} ({sorted(map(str, shards))[:3]})")
            if getattr(metadata, "storage_meta", None) is None:  # as torch's own read_metadata does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return RestrictedReader(str(folder))


def restricted_planner():
    """DCP's DefaultLoadPlanner, except that the non-tensor values it stores pickled (the
    optimizer's settings) must load with weights_only=True first: its own load_bytes unpickles
    them with weights_only=False."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class RestrictedPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            blob = value.read()
            try:
                torch.load(io.BytesIO(blob), weights_only=True)
            except pickle.UnpicklingError as e:  # its reason, without torch's advice to load it unsafely
                reason = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+", str(e))
                raise ValueError(f"a value of the DCP checkpoint ({read_item.dest_index.fqn}) holds more than plain "
                                 f"data and was refused (weights_only loading; nothing was run): "
                                 f"{reason[0] if reason else 'not a pickle of plain data'}")
            super().load_bytes(read_item, io.BytesIO(blob))  # the same bytes, shown to hold plain data only
    return RestrictedPlanner()


def full_state_dict(module: nn.Module) -> dict:
    """The whole, unsharded state dict on CPU (gathered on every rank for FSDP2 modules), for the
    single-file safetensors export that sample.py reads on one device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank src's Python object on every rank (e.g. the error of a save that only rank 0 does)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def load_full(module: nn.Module, state_dict: dict):
    """Unsharded weights (a one-process checkpoint) into a module, sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(module, state_dict, options=StateDictOptions(full_state_dict=True))
