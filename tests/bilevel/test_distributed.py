"""bilevel.distributed: sharding, bucketed collectives on 2 gloo processes, seeds, and the errors.

The collectives run once, in 2 processes started with ``torch.multiprocessing.spawn`` (gloo on the CPU);
each process records what it saw, and the tests below read those records.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

import bilevel as bl
from bilevel import distributed as bd

F32 = torch.float32  # the processes run with torch's default dtype; this file's default is float64
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", bd.TIMEOUT_ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the 2-process job: every collective of the module, then a peer that leaves."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = bd.init("cpu", timeout=20)
    calls = []
    real = torch.distributed.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append((tensor.dtype, tensor.numel()))
        return real(tensor, *args, **kwargs)

    torch.distributed.all_reduce = counting
    rec = {"ctx": (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, str(ctx.device), ctx.timeout)}

    # gradients of several shapes in one dtype: one collective; a float64 statistic beside them: one more
    grads = {"conv.weight": torch.full((4, 1, 3, 3), rank + 1.0), "conv.bias": torch.arange(4.0) * (rank + 1),
             "head": [torch.full((2, 4), 10.0 * rank), torch.ones(2)]}
    bd.all_reduce(grads)
    rec["sum"] = {k: v for k, v in grads.items()}
    rec["sum_calls"] = list(calls)
    calls.clear()
    mixed = [torch.full((3,), rank + 1.0), torch.full((2,), float(rank), dtype=torch.float64), torch.ones(5)]
    bd.all_reduce(mixed)
    rec["mixed"] = mixed
    rec["mixed_calls"] = list(calls)
    calls.clear()
    rec["mean"] = bd.all_reduce(torch.tensor([1.0 + rank, 3.0]), op="mean")
    rec["max"] = bd.all_reduce({"m": torch.tensor([float(rank), -float(rank)])}, op="max")["m"]
    rec["min"] = bd.all_reduce(torch.tensor([float(rank), 5.0 - rank]), op="min")

    # every rank starts from rank 0's parameters, whatever its own random state
    theta = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(rank)),
             "b": torch.randn(2, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))}
    bd.broadcast(theta)
    rec["broadcast"] = theta
    rec["object"] = bd.broadcast_object({"from": rank, "state": torch.arange(3) + rank})
    rec["gathered"] = bd.all_gather_object(("rank", rank))
    rec["seed"] = bd.rank_seed(5)

    # the meta-batch recipe: all ranks draw the same 7 "tasks", keep a shard, sum, all-reduce, divide by 7
    g = torch.Generator().manual_seed(0)
    tasks = torch.randn(7, 11, dtype=torch.float64, generator=g)
    mine = bd.shard({"x": tasks, "i": torch.arange(7)})
    local = mine["x"].sum(0) if len(mine["x"]) else torch.zeros(11, dtype=torch.float64)
    rec["shard_items"] = mine["i"].tolist()
    rec["mean_of_tasks"] = bd.all_reduce(local) / 7
    rec["single_process_mean"] = tasks.mean(0)
    bd.barrier()

    # a peer that leaves: rank 1 exits without taking part, rank 0's next collective must fail, not hang
    if rank == 1:
        torch.save(rec, os.path.join(out, f"rank{rank}.pt"))
        os._exit(0)
    try:
        bd.all_reduce(torch.ones(3))
        rec["after_peer_left"] = "no error"
    except bd.DistributedError as e:
        rec["after_peer_left"] = (str(e), e.timed_out)
    torch.save(rec, os.path.join(out, f"rank{rank}.pt"))
    bd.shutdown()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    saved = {k: os.environ.pop(k) for k in TORCHRUN_VARS if k in os.environ}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    finally:
        os.environ.update(saved)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_init_reads_torchruns_environment(records):
    for rank, rec in enumerate(records):
        assert rec["ctx"] == (rank, 2, rank, "gloo", "cpu", 20.0)


def test_all_reduce_sums_a_tree_in_one_collective_per_dtype(records):
    for rec in records:
        s = rec["sum"]
        torch.testing.assert_close(s["conv.weight"], torch.full((4, 1, 3, 3), 3.0, dtype=F32))
        torch.testing.assert_close(s["conv.bias"], torch.arange(4.0, dtype=F32) * 3)
        torch.testing.assert_close(s["head"][0], torch.full((2, 4), 10.0, dtype=F32))
        torch.testing.assert_close(s["head"][1], torch.full((2,), 2.0, dtype=F32))
        # four float32 tensors of 36 + 4 + 8 + 2 elements: one flat buffer, one collective
        assert rec["sum_calls"] == [(torch.float32, 50)]
        assert rec["mixed_calls"] == [(torch.float32, 8), (torch.float64, 2)]
        torch.testing.assert_close(rec["mixed"][0], torch.full((3,), 3.0, dtype=F32))
        assert rec["mixed"][1].dtype == torch.float64 and rec["mixed"][1].tolist() == [1.0, 1.0]
        torch.testing.assert_close(rec["mixed"][2], torch.full((5,), 2.0, dtype=F32))
        torch.testing.assert_close(rec["mean"], torch.tensor([1.5, 3.0], dtype=F32))
        torch.testing.assert_close(rec["max"], torch.tensor([1.0, 0.0], dtype=F32))
        torch.testing.assert_close(rec["min"], torch.tensor([0.0, 4.0], dtype=F32))


def test_broadcast_gives_every_rank_rank_0s_values(records):
    expected_w = torch.randn(3, 2, dtype=F32, generator=torch.Generator().manual_seed(0))
    expected_b = torch.randn(2, dtype=torch.float64, generator=torch.Generator().manual_seed(100))
    for rec in records:
        assert torch.equal(rec["broadcast"]["w"], expected_w)
        assert torch.equal(rec["broadcast"]["b"], expected_b)
        assert rec["object"]["from"] == 0 and rec["object"]["state"].tolist() == [0, 1, 2]
        assert rec["gathered"] == [("rank", 0), ("rank", 1)]
    assert records[0]["seed"] == bd.rank_seed(5, rank=0) != records[1]["seed"] == bd.rank_seed(5, rank=1)


def test_sharded_sum_over_ranks_equals_the_single_process_mean(records):
    assert records[0]["shard_items"] + records[1]["shard_items"] == list(range(7))
    assert records[0]["shard_items"] == [0, 1, 2, 3]
    for rec in records:
        torch.testing.assert_close(rec["mean_of_tasks"], rec["single_process_mean"], rtol=1e-14, atol=1e-15)


def test_a_rank_that_leaves_makes_the_next_collective_fail_with_a_clear_error(records):
    message, timed_out = records[0]["after_peer_left"]
    assert not timed_out
    assert message.startswith("all_reduce failed on rank 0 of 2: another rank stopped (it crashed or was killed)")
    assert "find the first error in the other ranks' output" in message


# --- one process: no group, and the mistakes ------------------------------------------------------


@pytest.fixture
def no_torchrun(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)


def test_without_torchrun_everything_is_the_one_process_identity(no_torchrun):
    ctx = bd.init("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.enabled, ctx.is_main) == (0, 1, None, False, True)
    assert ctx.timeout == bd.DEFAULT_TIMEOUT
    t = {"a": torch.ones(2)}
    assert bd.all_reduce(t, op="mean") is t and t["a"].tolist() == [1.0, 1.0]
    assert bd.broadcast(t) is t
    assert bd.broadcast_object(3) == 3 and bd.all_gather_object("x") == ["x"]
    assert bd.shard_range(5) == range(5)
    bd.barrier()
    assert bl.distributed is bd


@pytest.mark.parametrize("n, world", [(0, 1), (1, 3), (7, 2), (10, 3), (32, 8), (33, 8)])
def test_shards_cover_every_item_once_in_order_and_balanced(n, world):
    parts = [bd.shard_range(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shard_keeps_the_structure_and_named_tuples():
    from applications.imaml.data import Episode

    ep = Episode(*(torch.arange(6).view(6, 1) + 10 * i for i in range(6)))
    part = bd.shard(ep, rank=2, world_size=3)
    assert type(part) is Episode and part.query_x.view(-1).tolist() == [24, 25]
    with pytest.raises(ValueError, match=r"disagree on its size \(dim 0\): a: 3, b: 2"):
        bd.shard({"a": torch.zeros(3), "b": torch.zeros(2)}, rank=0, world_size=2)
    with pytest.raises(ValueError, match="is a 0-d tensor"):
        bd.shard(torch.tensor(1.0), rank=0, world_size=1)
    with pytest.raises(ValueError, match="rank 2 is not below world_size 2"):
        bd.shard_range(4, 2, 2)
    with pytest.raises(TypeError, match="pass rank together with world_size"):
        bd.shard_range(4, world_size=2)


def test_rank_seeds_differ_between_ranks_and_seeds_and_repeat():
    seeds = {(s, r): bd.rank_seed(s, r) for s in range(4) for r in range(16)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2 ** 63 for v in seeds.values())
    assert bd.rank_seed(3, 2) == seeds[(3, 2)]
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        bd.rank_seed(-1, 0)


def test_init_names_each_mistake(no_torchrun, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'mpi'; use one of 'gloo', 'nccl'"):
        bd.init("cpu", backend="mpi")
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0, got 0"):
        bd.init("cpu", timeout=0)
    monkeypatch.setenv(bd.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=r"\$BILEVEL_DIST_TIMEOUT='soon' is not a number of seconds"):
        bd.init("cpu")
    monkeypatch.setenv(bd.TIMEOUT_ENV, "12.5")
    assert bd.init("cpu").timeout == 12.5
    if not torch.cuda.is_available():
        with pytest.raises(bd.DistributedError, match="backend 'nccl' needs CUDA"):
            bd.init("cpu", backend="nccl")
    # launched by hand with part of torchrun's environment
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(bd.DistributedError, match="the environment lacks LOCAL_RANK, MASTER_ADDR, MASTER_PORT, "
                                                  "which torchrun sets"):
        bd.init("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(bd.DistributedError, match="'nccl' communicates between GPUs only"):
        bd.init("cpu", backend="nccl")
    if not torch.cuda.is_available():
        with pytest.raises(bd.DistributedError, match="torch sees no CUDA device on rank 0"):
            bd.init("cuda")


def test_collectives_name_bad_arguments(no_torchrun):
    with pytest.raises(ValueError, match="unknown op 'avg'"):
        bd.all_reduce(torch.ones(1), op="avg")
    with pytest.raises(TypeError, match="must be a tensor or a dict/list/tuple of tensors, but found NoneType"):
        bd.all_reduce({"w": None})
    with pytest.raises(ValueError, match="src must be a rank from 0 to 0, got 1"):
        bd.broadcast(torch.ones(1), src=1)
    with pytest.raises(TypeError, match="op='mean' divides by the world size and needs floating tensors"):
        bd.all_reduce([torch.ones(2), torch.ones(2, dtype=torch.int64)], op="mean")
    err = bd.DistributedError("x", timed_out=True)
    import pickle

    assert pickle.loads(pickle.dumps(err)).timed_out is True


@pytest.mark.parametrize("torch_says, timed_out, cause", [
    ("[pair.cc:561] Connection closed by peer [127.0.0.1]:7569", False, "another rank stopped (it crashed or was killed)"),
    ("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete", True,
     "a rank did not take part within the process group's timeout of 600 s"),
    ("[enforce fail at pair.cc:446] op.preamble.length <= op.nbytes. 1046204 vs 1040256", False,
     "the collective failed"),
])
def test_a_failed_collective_says_what_happened_and_what_to_do(no_torchrun, torch_says, timed_out, cause):
    def collective():
        raise RuntimeError(torch_says)

    with pytest.raises(bd.DistributedError) as info:
        bd._collective("all_reduce", collective)
    assert info.value.timed_out is timed_out
    message = str(info.value)
    assert message.startswith(f"all_reduce failed on rank 0 of 1: {cause}")
    assert torch_says in message and "The job cannot continue" in message
