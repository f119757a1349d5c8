"""The NCCL glue (nanovllm/distributed/nccl.py) against a stand-in for `cupy.cuda.nccl`.

`FakeNccl` has the names and signatures of CuPy's binding (cupy_backends/cuda/libs/nccl.pyx and
nccl.pxd: `get_unique_id()`, `NcclCommunicator(ndev, commId, rank)`, `allReduce(sendbuf, recvbuf,
count, datatype, op, stream)`, `allGather(sendbuf, recvbuf, count, datatype, stream)`, the enum
values) and enforces what real NCCL would otherwise answer with a hang or corrupt memory: a
128-byte id from get_unique_id, every rank of the group joining the init, contiguous buffers,
`count` in elements of a `datatype` that is the buffer's dtype, all-gather's receive buffer of
ranks x count, the same collectives in the same order on every rank, and the stream the model's
kernels run on. It performs the collectives for real (sums in rank order), so a whole sharded
model runs through the glue on the emulated device and must give the reference's logits.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from checkpoints import KINDS
from test_tensor_parallel import BLOCK, MAX_POSITIONS, PROMPT, one_sequence, sharded_logits

from nanovllm.backends import get_backend
from nanovllm.distributed.communicator import CollectiveMismatch, LockStep
from nanovllm.distributed.nccl import NcclCommunicator
from nanovllm.distributed.ranks import LocalRanks
from nanovllm.models.loader import load_checkpoint

STREAM = 0x7F00_5EED  # the "current stream" of these tests: not the legacy default stream 0
_DTYPES = {0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64,
           6: np.float16, 7: np.float32, 8: np.float64}  # fmt: skip


class FakeNccl:
    NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN, NCCL_AVG = 0, 1, 2, 3, 4
    NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = 0, 1, 2, 3, 4, 5
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_BFLOAT16 = 6, 7, 8, 9
    available = True

    def __init__(self, steps: LockStep) -> None:
        self.steps = steps
        self.ids: set[tuple[int, ...]] = set()
        self.buffers: dict[int, np.ndarray] = {}  # "device pointer" -> the array behind it
        self._handles = itertools.count(1)
        self.calls: list[list[tuple]] = [[] for _ in range(steps.size)]  # per rank

    def get_unique_id(self) -> tuple[int, ...]:
        uid = tuple(int(b) for b in np.random.default_rng(len(self.ids)).integers(-128, 128, 128))
        self.ids.add(uid)
        return uid

    def address(self, x: np.ndarray) -> int:
        """The glue's view of an array's device pointer."""
        handle = next(self._handles) << 12
        self.buffers[handle] = x
        return handle

    def current_stream(self) -> int:
        return STREAM

    def NcclCommunicator(self, ndev: int, commId: tuple, rank: int) -> FakeCommunicator:  # noqa: N802
        return FakeCommunicator(self, ndev, commId, rank)


class FakeCommunicator:
    def __init__(self, nccl: FakeNccl, ndev: int, commId: tuple, rank: int) -> None:  # noqa: N803
        assert isinstance(commId, tuple) and len(commId) == 128  # as CuPy's __init__ asserts
        assert commId in nccl.ids, "not an id from get_unique_id"
        assert ndev == nccl.steps.size and 0 <= rank < ndev
        self.nccl, self.rank, self.ndev = nccl, rank, ndev
        # ncclCommInitRank returns once every rank has joined with the same id.
        nccl.steps.exchange(rank, (commId, ndev, rank), _check_init)
        nccl.calls[rank].append(("init",))

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # noqa: N802
        send, recv = self._buffer(sendbuf, datatype), self._buffer(recvbuf, datatype)
        assert send.size == recv.size == count, (count, send.size, recv.size)
        assert op == FakeNccl.NCCL_SUM
        total = self._collective("allReduce", count, datatype, stream, send)
        recv.reshape(-1)[:] = total  # written in place, as the device writes the buffer

    def allGather(self, sendbuf, recvbuf, count, datatype, stream):  # noqa: N802
        send, recv = self._buffer(sendbuf, datatype), self._buffer(recvbuf, datatype)
        assert send.size == count and recv.size == self.ndev * count, (count, send.size, recv.size)
        recv.reshape(-1)[:] = self._collective("allGather", count, datatype, stream, send)

    def destroy(self) -> None:
        self.nccl.calls[self.rank].append(("destroy",))

    def _buffer(self, pointer: int, datatype: int) -> np.ndarray:
        array = self.nccl.buffers[pointer]  # KeyError: not a buffer the glue allocated
        assert array.flags.c_contiguous, "NCCL reads count elements from the pointer on"
        assert array.dtype == _DTYPES[datatype], f"datatype {datatype} for a {array.dtype} buffer"
        return array

    def _collective(self, op: str, count: int, datatype: int, stream: int, send: np.ndarray):
        assert stream == STREAM, f"{op} on stream {stream:#x}, the kernels run on {STREAM:#x}"
        self.nccl.calls[self.rank].append((op, count, datatype))
        combine = _sum if op == "allReduce" else np.concatenate
        return self.nccl.steps.exchange(self.rank, (op, count, datatype, send.reshape(-1).copy()), lambda slots: _run(slots, combine))  # fmt: skip


def _check_init(slots: list) -> None:
    if len({(uid, ndev) for uid, ndev, _ in slots}) != 1:
        raise CollectiveMismatch("ranks joined with different ids or sizes")


def _sum(payloads: list[np.ndarray]) -> np.ndarray:
    total = payloads[0].copy()
    for payload in payloads[1:]:
        total += payload
    return total


def _run(slots: list, combine) -> np.ndarray:
    if len({slot[:3] for slot in slots}) != 1:  # NCCL would hang or mix up the buffers
        raise CollectiveMismatch(f"ranks issued different collectives: {[s[:3] for s in slots]}")
    return combine([slot[3] for slot in slots])


def nccl_ranks(checkpoint, backend, size: int) -> tuple[LocalRanks, FakeNccl]:
    steps = LockStep(size)
    nccl = FakeNccl(steps)
    uid = nccl.get_unique_id()  # rank 0 makes it; every rank receives it

    def connect(rank: int) -> NcclCommunicator:
        return NcclCommunicator(
            uid, rank, size, backend.xp, nccl, nccl.address, nccl.current_stream
        )

    comms = steps.run([lambda r=r: connect(r) for r in range(size)])
    return LocalRanks(checkpoint, backend, MAX_POSITIONS, comms, steps.run), nccl


@pytest.mark.parametrize("kind", KINDS)
def test_a_sharded_model_through_nccl_gives_the_reference_logits(checkpoint_factory, kind):
    checkpoint = load_checkpoint(str(checkpoint_factory(kind)))
    backend = get_backend("cuda-emulated", "float32")
    for size in (2, 4):
        ranks, _ = nccl_ranks(checkpoint, backend, size)
        ranks.allocate_kv_cache(-(-len(PROMPT) // BLOCK), BLOCK)
        got = ranks.execute(one_sequence(PROMPT), BLOCK)
        # Both sum in rank order in float32: the same bits.
        np.testing.assert_array_equal(got, sharded_logits(checkpoint, backend, size, PROMPT))


@pytest.mark.parametrize("dtype, datatype", [("float32", 7), ("float16", 6)])
def test_every_rank_issues_the_same_collectives_with_counts_and_datatypes_of_the_step(
    checkpoint_factory, dtype, datatype
):
    checkpoint = load_checkpoint(str(checkpoint_factory("llama3")))
    config = checkpoint.config
    ranks, nccl = nccl_ranks(checkpoint, get_backend("cuda-emulated", dtype), 2)
    ranks.allocate_kv_cache(2, BLOCK)
    ranks.execute(one_sequence(PROMPT), BLOCK)
    tokens, hidden = len(PROMPT), config.hidden_size
    per_rank_vocab = -(-config.vocab_size // 2)
    expected = (
        [("init",), ("allReduce", tokens * hidden, datatype)]  # the embedding
        + [("allReduce", tokens * hidden, datatype)] * (2 * config.num_layers)  # o_proj, down
        + [("allGather", tokens * per_rank_vocab, datatype)]  # the logits
    )
    assert nccl.calls == [expected, expected]


def test_the_glue_passes_contiguous_buffers_and_refuses_dtypes_it_has_no_datatype_for():
    steps = LockStep(2)
    nccl = FakeNccl(steps)
    uid = nccl.get_unique_id()
    comms = steps.run(
        [lambda r=r: NcclCommunicator(uid, r, 2, np, nccl, nccl.address, nccl.current_stream) for r in range(2)]
    )  # fmt: skip
    parts = [np.arange(12, dtype=np.float32).reshape(3, 4).T * (r + 1) for r in range(2)]  # views
    totals = steps.run([lambda r=r: comms[r].all_reduce(parts[r]) for r in range(2)])
    np.testing.assert_array_equal(totals[0], parts[0] + parts[1])
    joined = steps.run([lambda r=r: comms[r].all_gather(parts[r]) for r in range(2)])
    np.testing.assert_array_equal(joined[1], np.concatenate(parts, axis=-1))
    with pytest.raises(TypeError, match="float16 or float32"):
        comms[0].all_reduce(np.ones(3, dtype=np.int64))


def test_the_stand_in_refuses_what_nccl_would_hang_on():
    steps = LockStep(2)
    nccl = FakeNccl(steps)
    uid = nccl.get_unique_id()
    with pytest.raises(AssertionError):
        nccl.NcclCommunicator(2, uid[:64], 0)
    with pytest.raises(CollectiveMismatch, match="rank 0 contributed twice"):
        steps.run([lambda: nccl.NcclCommunicator(2, uid, 0)] * 2)
    comms = steps.run([lambda r=r: nccl.NcclCommunicator(2, uid, r) for r in range(2)])
    x = np.ones(4, dtype=np.float32)
    a, b = nccl.address(x), nccl.address(np.empty(4, dtype=np.float32))
    with pytest.raises(AssertionError, match="datatype 6 for a float32 buffer"):
        comms[0].allReduce(a, b, 4, FakeNccl.NCCL_FLOAT16, FakeNccl.NCCL_SUM, STREAM)
    with pytest.raises(AssertionError, match="on stream 0x0"):
        comms[0].allReduce(a, b, 4, FakeNccl.NCCL_FLOAT32, FakeNccl.NCCL_SUM, 0)
    with pytest.raises(CollectiveMismatch, match="different collectives"):
        steps.run([
            lambda: comms[0].allReduce(a, b, 4, FakeNccl.NCCL_FLOAT32, FakeNccl.NCCL_SUM, STREAM),
            lambda: comms[1].allGather(a, nccl.address(np.empty(8, np.float32)), 4, FakeNccl.NCCL_FLOAT32, STREAM),
        ])  # fmt: skip
