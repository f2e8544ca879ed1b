"""NCCL weight transfer (``trainer.weight_transfer = "nccl"``, GPUs and ``trainer.finetune = "full"`` only).

Trainer rank 0 and every GPU worker of every student engine form one extra NCCL group, apart from the
trainer's FSDP2 group and each engine's own tensor-parallel group (vLLM's ``StatelessProcessGroup`` +
``PyNcclCommunicator``, through vLLM 0.32's weight-transfer worker API: ``init_weight_transfer_engine``,
``start_weight_update`` / ``update_weights`` / ``finish_weight_update``, each reached with
``LLM.collective_rpc``).  The group's ranks (:func:`plan`):

- rank 0: trainer rank 0, the only sender; it hosts the rendezvous store at ``master_address:master_port``;
- engine ``i`` (tensor-parallel size ``tp``): ranks ``1 + i*tp .. 1 + i*tp + tp - 1``, passed to vLLM as
  ``rank_offset = 1 + i*tp``.  Our engines are separate ``LLM`` instances, so vLLM's own data-parallel
  index is 0 in each and the offset alone keeps their ranks apart;
- ``world_size = 1 + engines * tp``.

``master_address`` is 127.0.0.1 when every engine runs on the trainer's node (nothing listens beyond
loopback), else the trainer node's address; the port is one the trainer's node had free when asked.

Each update (the orchestrator submits both sides at once, the NCCL calls rendezvous): every trainer rank
walks ``named_parameters`` gathering each full tensor (an FSDP2 collective), cast to the engines' dtype;
rank 0 broadcasts each, in that order, one tensor per NCCL call.  The engines were told the same
``(names, dtype_names, shapes)`` list (:func:`update_info`, computed once from the sharded parameters'
global shapes without gathering); each receives into a fresh buffer and hands it to vLLM's
``model.load_weights`` inside vLLM's layer-wise reload, then the prefix cache is reset.  A tensor that
disagrees with the list stops the sender with its name (:func:`broadcast_all`) rather than hang or load
garbage.

Nothing here runs on the CPU (NCCL needs GPUs); the plan and the order of what is sent are tested on the
CPU (``tests/test_full_finetune.py``) with a recording stand-in for the communicator.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class GroupPlan:
    master_address: str
    master_port: int
    world_size: int
    rank_offsets: tuple[int, ...]  # per engine: the group rank of its tensor-parallel rank 0

    def engine_init(self, engine: int) -> dict:
        """The payload of vLLM's ``init_weight_transfer_engine`` for engine ``engine`` (one tensor per call:
        ``packed = False``)."""
        return dict(master_address=self.master_address, master_port=self.master_port,
                    rank_offset=self.rank_offsets[engine], world_size=self.world_size, packed=False)


def plan(trainer_address: str, port: int, engine_addresses: list[str], tp: int) -> GroupPlan:
    """The weight-update group of one sender (trainer rank 0) and ``len(engine_addresses)`` engines of
    ``tp`` GPU workers each (see the module docstring)."""
    if not engine_addresses:
        raise ValueError("weight transfer: no inference engines to send weights to")
    if tp < 1 or not 0 < port < 65536:
        raise ValueError(f"weight transfer: bad tp {tp} or port {port}")
    local = all(a == trainer_address for a in engine_addresses)
    return GroupPlan(master_address=LOOPBACK if local else trainer_address, master_port=port,
                     world_size=1 + len(engine_addresses) * tp,
                     rank_offsets=tuple(1 + i * tp for i in range(len(engine_addresses))))


def update_info(meta: list[tuple[str, str, list[int]]]) -> dict:
    """vLLM's per-update payload (``NCCLWeightTransferUpdateInfo``): the tensors in the order they are sent."""
    return dict(names=[m[0] for m in meta], dtype_names=[m[1] for m in meta], shapes=[list(m[2]) for m in meta])


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def free_port() -> int:
    """A port free on this node now, probed on loopback (nothing the project opens listens on every
    interface, even for a moment; a port free on loopback is, in practice, free on the node's address)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- trainer side (rank 0) -------------------------------------------------------------------------------
def trainer_join(address: str, port: int, world_size: int):
    """Open the group as its rank 0 on this process's GPU; blocks until every engine worker has joined."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init(dict(master_address=address, master_port=port, world_size=world_size), rank=0)


def broadcast_all(group, tensors: Iterable[tuple[str, torch.Tensor]], meta: list[tuple[str, str, list[int]]]) -> int:
    """Broadcast each ``(name, tensor)`` from rank 0, checking it against ``meta`` (what the engines were told
    to expect, in order); returns how many were sent."""
    sent = 0
    stream = torch.cuda.current_stream() if torch.cuda.is_available() else None
    for name, tensor in tensors:
        if sent >= len(meta):
            raise ValueError(f"weight transfer: {name!r} is beyond the {len(meta)} tensors the engines expect")
        want = meta[sent]
        got = (name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
        if got != (want[0], want[1], list(want[2])):
            raise ValueError(f"weight transfer: tensor {sent} is {got}, the engines expect {tuple(want)}")
        group.broadcast(tensor.contiguous(), src=0, stream=stream)
        sent += 1
    if sent != len(meta):
        raise ValueError(f"weight transfer: sent {sent} tensors, the engines expect {len(meta)}")
    if stream is not None:
        stream.synchronize()  # the next optimizer step may overwrite the gathered tensors' sources
    return sent


# -- engine side ---------------------------------------------------------------------------------------------
def engine_config() -> dict:
    """``vllm.LLM`` keyword arguments that give each worker vLLM's NCCL weight-transfer engine."""
    from vllm.config.weight_transfer import WeightTransferConfig

    return dict(weight_transfer_config=WeightTransferConfig(backend="nccl"))


def engine_join(llm, init: dict) -> None:
    """Every worker of ``llm`` joins the group (blocks until the trainer and every other engine have)."""
    llm.collective_rpc("init_weight_transfer_engine", args=(init,))


def engine_receive(llm, info: dict) -> None:
    """Receive one full update and load it (vLLM's layer-wise reload); cached keys/values are then stale."""
    llm.collective_rpc("start_weight_update")
    llm.collective_rpc("update_weights", args=(info,))
    llm.collective_rpc("finish_weight_update")
    llm.reset_prefix_cache()
