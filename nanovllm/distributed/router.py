"""Which replica takes a request: least outstanding work, with prefix affinity.

Prefix caching only pays if requests that share a prefix meet on the replica that cached it.
The router keys each prompt by the chained hashes of its first full blocks (as the block
manager keys its cache, nanovllm/engine/block_manager.py; the last prompt token never counts,
since it is always computed) and remembers which replica each key was last sent to. A new
request goes to the replica holding its longest known prefix, unless that replica has more than
`max_imbalance` more requests in flight than the least loaded one (then recomputing the prefix
elsewhere is cheaper than waiting); otherwise to the least loaded replica (ties: lowest index).

Outstanding work is the number of sequences the router has in flight on each replica, counted
exactly (at submission and at the end of each request), so the decision needs no message to
any replica. The table is approximate, as SGLang's cache-aware router's: a replica's cache may
have evicted a remembered prefix (a miss, never a wrong answer), and a replica that restarts
lost its cache, so its entries are dropped (its epoch moves on).

String prompts are tokenized for the key on the front end, only a prefix of the text (tokenizing
is the decision's main cost: ~0.9 ms for 1,000 characters with the test model's tokenizer):
the first `AFFINITY_BLOCKS` blocks need that many tokens, and English text averages about four
characters a token with the usual vocabularies, so six characters a token leave a margin.
Cutting the text can change the last few tokens, so a cut prompt keeps only tokens well before
the cut; at worst a prompt gets fewer keys, or two prompts that share a prefix miss each other.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from nanovllm.engine.block_manager import block_hash

AFFINITY_BLOCKS = 4  # prefix blocks remembered per prompt
TABLE_SIZE = 1 << 16  # remembered prefixes, least recently used dropped first
_CHARS_PER_TOKEN = 6  # text tokenized per token needed
_CUT_MARGIN = 8  # tokens dropped before a cut in the text
RECENT_DECISIONS = 32  # shown in /v1/engine/state


@dataclass(slots=True)
class Decision:
    request_id: str
    engine: int
    reason: str  # "prefix" | "least_loaded" | "prefix_too_busy"
    prefix_blocks: int  # blocks of the prompt's prefix the table knew
    loads: list[int]  # sequences in flight per replica when it was decided
    affine: int | None = None  # the replica that held the prefix, if any


@dataclass(slots=True)
class _Entry:
    engine: int
    epoch: int


@dataclass
class Router:
    num_replicas: int
    block_size: int
    max_imbalance: int
    loads: list[int] = field(init=False)
    epochs: list[int] = field(init=False)
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_DECISIONS))
    reasons: Counter = field(default_factory=Counter)
    _table: OrderedDict = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.loads = [0] * self.num_replicas
        self.epochs = [0] * self.num_replicas

    # ---- keys --------------------------------------------------------------------------------
    def prefix_keys(
        self, prompt: str | list[int], encode: Callable[[str], list[int]] | None
    ) -> list[int]:
        """Chained hashes of the prompt's first full blocks (at most AFFINITY_BLOCKS); `encode`
        tokenizes a text prompt (a list of ids needs none)."""
        ids = prompt if isinstance(prompt, list) else self._leading_ids(prompt, encode)
        size, keys, parent = self.block_size, [], None
        usable = min(len(ids) - 1, AFFINITY_BLOCKS * size)  # never the last token
        for start in range(0, usable - size + 1, size):
            parent = block_hash(parent, tuple(ids[start : start + size]))
            keys.append(parent)
        return keys

    def _leading_ids(self, text: str, encode: Callable[[str], list[int]]) -> list[int]:
        needed = AFFINITY_BLOCKS * self.block_size + 1
        cut = needed * _CHARS_PER_TOKEN
        if len(text) <= cut:
            return encode(text)
        return encode(text[:cut])[:-_CUT_MARGIN]

    # ---- decisions ---------------------------------------------------------------------------
    def choose(self, request_id: str, keys: list[int], alive: list[bool]) -> Decision | None:
        """The replica for a request with these prefix keys, among the living; None if none is."""
        living = [i for i in range(self.num_replicas) if alive[i]]
        if not living:
            return None
        least = min(living, key=lambda i: (self.loads[i], i))
        affine, blocks = self._affine(keys, alive)
        if affine is None:
            engine, reason = least, "least_loaded"
        elif self.loads[affine] - self.loads[least] > self.max_imbalance:
            engine, reason = least, "prefix_too_busy"
        else:
            engine, reason = affine, "prefix"
        decision = Decision(request_id, engine, reason, blocks, list(self.loads), affine)
        self._remember(keys, engine)
        self.recent.append(decision)
        self.reasons[reason] += 1
        return decision

    def started(self, engine: int, sequences: int) -> None:
        self.loads[engine] += sequences

    def finished(self, engine: int, sequences: int) -> None:
        self.loads[engine] -= sequences

    def forget(self, engine: int) -> None:
        """The replica lost its cache (it died): its remembered prefixes no longer hold."""
        self.epochs[engine] += 1

    def describe(self) -> dict:
        return {
            "policy": "least outstanding sequences, with prefix affinity",
            "affinity_blocks": AFFINITY_BLOCKS,
            "max_imbalance": self.max_imbalance,
            "outstanding": list(self.loads),
            "decisions_by_reason": dict(self.reasons),
            "recent_decisions": [asdict(d) for d in self.recent],
        }

    def _affine(self, keys: list[int], alive: list[bool]) -> tuple[int | None, int]:
        for blocks in range(len(keys), 0, -1):  # the longest known prefix first
            entry = self._table.get(keys[blocks - 1])
            if entry is not None and entry.epoch == self.epochs[entry.engine]:
                if alive[entry.engine]:
                    return entry.engine, blocks
        return None, 0

    def _remember(self, keys: list[int], engine: int) -> None:
        for key in keys:
            self._table[key] = _Entry(engine, self.epochs[engine])
            self._table.move_to_end(key)
        while len(self._table) > TABLE_SIZE:
            self._table.popitem(last=False)
