"""The RFC 9162 (RFC 6962) Merkle tree over the event log: roots, proofs and their verification.

Leaves are SHA-256(0x00 || leaf bytes) and inner nodes SHA-256(0x01 || left || right), so a leaf can
never be passed off as an inner node; the empty tree's root is SHA-256(""). A tree of n leaves
splits at the largest power of two below n (RFC 9162, section 2.1.1), which is what makes every
older tree a prefix that a short consistency proof can tie to any newer one.

```python
tree = CompactTree()                        # the sealer: O(log n) per appended leaf
tree.append(leaf_hash(record_bytes))
proof = inclusion_proof(leaf_hashes, index, size)       # the hub, from stored leaf hashes
verify_inclusion(leaf_hash(record_bytes), index, size, proof, checkpoint_root)  # the auditor
```

Proofs are generated from a sequence of leaf hashes that is only ever indexed (never copied or
sliced); that recomputes the subtree hashes it needs, O(n) per proof. A log that keeps the roots
of its perfect subtrees as it grows (``CompactTree.append`` hands each one over as it completes)
makes them from those instead (``inclusion_proof_from``, ``consistency_proof_from``,
``root_from`` over a ``SubtreeSource``): only the right edge of the tree is not a stored subtree,
so a proof costs O(log² n) lookups at most, O(log n) as a rule. The verifiers are O(log n) and
check every step.

Errors: ``ProofError`` (a ``ValueError``) when a proof does not prove what it claims, with the
reason; a plain ``ValueError`` for arguments no proof could be made from (a leaf hash of the wrong
length, an index outside the tree).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactTree",
    "CompactTreeState",
    "ProofError",
    "Subtree",
    "SubtreeSource",
    "consistency_proof",
    "consistency_proof_from",
    "inclusion_proof",
    "inclusion_proof_from",
    "leaf_hash",
    "node_hash",
    "perfect_subtrees",
    "root",
    "root_from",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32  # SHA-256
EMPTY_ROOT = hashlib.sha256(b"").digest()

# The domain-separation prefixes of RFC 9162, section 2.1.1.
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


class ProofError(ValueError):
    """A proof that does not prove what it claims; the message says which check failed."""


def leaf_hash(data: bytes) -> bytes:
    """The hash of one leaf: SHA-256(0x00 || data)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The hash of an inner node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def root(leaf_hashes: Sequence[bytes], size: int | None = None) -> bytes:
    """The root (MTH) of the tree of the first ``size`` leaf hashes (all of them by default)."""
    size = len(leaf_hashes) if size is None else size
    _check_size(leaf_hashes, size)
    if size == 0:
        return EMPTY_ROOT
    return _subtree_root(leaf_hashes, 0, size)


class CompactTreeState(TypedDict):
    """What ``CompactTree.to_dict`` gives: JSON-ready, hashes as lowercase hex."""

    size: int
    hashes: list[str]


class CompactTree:
    """An append-only Merkle tree that keeps only the roots of its perfect subtrees.

    A tree of n leaves is a row of perfect subtrees, one per set bit of n, largest on the left;
    this keeps their roots (at most log2(n) + 1 hashes), which is all a sealer needs to extend the
    tree and compute its root while reading the log once. Persist ``to_dict()`` with the log
    position it was built up to, and resume with ``from_dict``.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []  # perfect subtree roots, largest (leftmost) first

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """The perfect subtree roots, left to right (what ``to_dict`` stores)."""
        return tuple(self._hashes)

    def append(self, leaf_hash: bytes) -> list[Subtree]:
        """Add the next leaf (its hash, as ``leaf_hash()`` gives it). Returns the perfect
        subtrees of two leaves or more that this leaf completed, smallest first: what a log
        stores to make proofs from (``SubtreeSource``) without reading every leaf again."""
        _check_hash(leaf_hash, "leaf hash")
        node = leaf_hash
        completed: list[Subtree] = []
        # Each trailing set bit of the old size is a perfect subtree as large as the one being
        # carried: the two merge into one twice as large, exactly like binary addition of 1.
        bits, level = self._size, 0
        while bits & 1:
            node = node_hash(self._hashes.pop(), node)
            bits >>= 1
            level += 1
            completed.append(Subtree(level, self._size >> level, node))
        self._hashes.append(node)
        self._size += 1
        return completed

    def root(self) -> bytes:
        """The root of the tree so far (equal to ``root()`` of all leaf hashes appended)."""
        if not self._hashes:
            return EMPTY_ROOT
        # MTH splits at the largest power of two, so the leftmost subtree is the left child of the
        # root and the rest of the row folds up from the right.
        result = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            result = node_hash(left, result)
        return result

    def to_dict(self) -> CompactTreeState:
        return {"size": self._size, "hashes": [value.hex() for value in self._hashes]}

    @classmethod
    def from_dict(cls, state: Mapping[str, object]) -> CompactTree:
        """The tree ``to_dict`` described; ``ValueError`` if the state cannot be such a tree."""
        size = state.get("size")
        hashes = state.get("hashes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"compact tree state: size must be a non-negative integer: {size!r}")
        if not isinstance(hashes, list) or not all(isinstance(value, str) for value in hashes):
            raise ValueError("compact tree state: hashes must be a list of hex strings")
        # One perfect subtree per set bit of the size: any other count is a corrupt state.
        if len(hashes) != size.bit_count():
            raise ValueError(
                f"compact tree state: a tree of {size} leaves has {size.bit_count()} subtree "
                f"hashes, not {len(hashes)}"
            )
        tree = cls()
        for position, value in enumerate(hashes):
            try:
                decoded = bytes.fromhex(value)
            except ValueError:
                raise ValueError(f"compact tree state: hash #{position} is not hex") from None
            _check_hash(decoded, f"compact tree state: hash #{position}")
            tree._hashes.append(decoded)
        tree._size = size
        return tree

    def __repr__(self) -> str:
        return f"CompactTree(size={self._size})"


@dataclass(frozen=True, slots=True)
class Subtree:
    """A perfect subtree: the ``index``-th run of 2**``level`` leaves (leaves
    ``index << level`` to ``((index + 1) << level) - 1``) and its root hash."""

    level: int
    index: int
    hash: bytes


class SubtreeSource(Protocol):
    """Where a log keeps the roots of its perfect subtrees (level 0: the leaf hashes)."""

    def perfect(self, level: int, index: int) -> bytes:
        """The root hash of the ``index``-th perfect subtree of 2**``level`` leaves."""
        ...


def perfect_subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """The perfect subtrees, as (level, index), whose roots make up MTH(D[start:end]) for a
    range that RFC 9162's recursion produces (``start`` a multiple of the next power of two at
    or above its length), left to right: the range is one such subtree per set bit of its
    length, largest first."""
    if not 0 <= start < end:
        raise ValueError(f"not a non-empty range of leaves: {start}..{end}")
    found = []
    while start < end:
        level = (end - start).bit_length() - 1
        if start & ((1 << level) - 1):
            raise ValueError(f"leaves {start}..{end} are not a range of the tree's recursion")
        found.append((level, start >> level))
        start += 1 << level
    return found


def root_from(source: SubtreeSource, size: int) -> bytes:
    """The root of the tree of ``size`` leaves, from the roots of its perfect subtrees."""
    if size < 0:
        raise ValueError(f"a tree size is not negative: {size}")
    return _range_root_from(source, 0, size) if size else EMPTY_ROOT


def inclusion_proof_from(source: SubtreeSource, index: int, size: int) -> list[bytes]:
    """``inclusion_proof`` from the roots of perfect subtrees, not from every leaf hash."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of {size} leaves")
    return _path(_source_roots(source), index, 0, size)


def consistency_proof_from(source: SubtreeSource, size1: int, size2: int) -> list[bytes]:
    """``consistency_proof`` from the roots of perfect subtrees, not from every leaf hash."""
    if not 0 < size1 <= size2:
        raise ValueError(f"no consistency proof from size {size1} to size {size2}")
    return _subproof(_source_roots(source), size1, 0, size2, complete=True)


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of the first ``size`` leaf hashes
    (RFC 9162, section 2.1.3.1: PATH), nearest sibling first."""
    _check_size(leaf_hashes, size)
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of {size} leaves")
    return _path(_leaf_roots(leaf_hashes), index, 0, size)


def consistency_proof(leaf_hashes: Sequence[bytes], size1: int, size2: int) -> list[bytes]:
    """The proof that the tree of the first ``size1`` leaves is a prefix of the tree of the first
    ``size2`` (RFC 9162, section 2.1.4.1: PROOF); empty when the sizes are equal."""
    _check_size(leaf_hashes, size2)
    if not 0 < size1 <= size2:
        # A proof from the empty tree proves nothing, and the verifier refuses it.
        raise ValueError(f"no consistency proof from size {size1} to size {size2}")
    return _subproof(_leaf_roots(leaf_hashes), size1, 0, size2, complete=True)


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``proof`` puts ``leaf_hash`` at ``index`` in the tree of ``size`` leaves whose
    root is ``root`` (RFC 9162, section 2.1.3.2); ``ProofError`` says why not."""
    _check_proof_hash(leaf_hash, "the leaf hash")
    if index < 0 or size < 0:
        raise ProofError(f"negative leaf index or tree size: {index}, {size}")
    if index >= size:
        raise ProofError(f"leaf index {index} is not below the tree size {size}")
    # fn walks the leaf's position up the tree, sn the last leaf's: where they meet is the root.
    fn, sn = index, size - 1
    result = leaf_hash
    for position, sibling in enumerate(proof):
        _check_proof_hash(sibling, f"proof hash #{position}")
        if sn == 0:
            raise ProofError("the proof is longer than the path from the leaf to the root")
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            # A node on the right edge with no sibling at this level moves up unchanged.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            result = node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the proof is shorter than the path from the leaf to the root")
    if result != root:
        raise ProofError("the proof leads to a different root hash")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Check that the tree of ``size1`` leaves with root ``root1`` is a prefix of the tree of
    ``size2`` leaves with root ``root2`` (RFC 9162, section 2.1.4.2); ``ProofError`` says why not.
    """
    if size1 < 0 or size2 < 0:
        raise ProofError(f"negative tree size: {size1}, {size2}")
    if size2 < size1:
        raise ProofError(f"the second tree ({size2} leaves) is smaller than the first ({size1})")
    if size1 == 0:
        # Every tree extends the empty tree: such a proof would prove nothing, so it is refused
        # rather than accepted for any roots (the probes of transparency-dev/merkle say so too).
        raise ProofError("a consistency proof from the empty tree is meaningless")
    if size1 == size2:
        if proof:
            raise ProofError("the trees have the same size, so the proof must be empty")
        if root1 != root2:
            raise ProofError("the trees have the same size but different root hashes")
        return
    if not proof:
        raise ProofError("the proof is empty")
    for position, value in enumerate(proof):
        _check_proof_hash(value, f"proof hash #{position}")
    path = list(proof)
    if size1 & (size1 - 1) == 0:
        # The first tree is a perfect subtree of the second, so its root is the proof's start.
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    first = second = path[0]  # rebuild both roots from the same path
    for value in path[1:]:
        if sn == 0:
            raise ProofError("the proof is longer than the path between the two trees")
        if fn & 1 or fn == sn:
            first = node_hash(value, first)
            second = node_hash(value, second)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            second = node_hash(second, value)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the proof is shorter than the path between the two trees")
    if first != root1:
        raise ProofError("the proof does not lead to the first tree's root hash")
    if second != root2:
        raise ProofError("the proof does not lead to the second tree's root hash")


# --- over ranges of leaf hashes ------------------------------------------------------------------


def _split(count: int) -> int:
    """The largest power of two smaller than ``count`` (count >= 2): where MTH splits a tree."""
    return 1 << ((count - 1).bit_length() - 1)


def _subtree_root(leaf_hashes: Sequence[bytes], start: int, end: int) -> bytes:
    """MTH(D[start:end]) for a non-empty range, by the definition (indexing only)."""
    if end - start == 1:
        value = leaf_hashes[start]
        _check_hash(value, f"leaf hash #{start}")
        return value
    middle = start + _split(end - start)
    return node_hash(
        _subtree_root(leaf_hashes, start, middle), _subtree_root(leaf_hashes, middle, end)
    )


# The roots of ranges of leaves D[start:end], however they are found: the proofs below are the
# RFC's definitions over such a function, so both ways of finding them make the same proofs.
_RangeRoot = Callable[[int, int], bytes]


def _leaf_roots(leaf_hashes: Sequence[bytes]) -> _RangeRoot:
    return lambda start, end: _subtree_root(leaf_hashes, start, end)


def _source_roots(source: SubtreeSource) -> _RangeRoot:
    return lambda start, end: _range_root_from(source, start, end)


def _range_root_from(source: SubtreeSource, start: int, end: int) -> bytes:
    """MTH(D[start:end]) from perfect subtree roots: one lookup if the range is a perfect
    subtree (every range left of the right edge is), else its subtrees folded from the right."""
    parts = perfect_subtrees(start, end)
    result = _checked(source.perfect(*parts[-1]), parts[-1])
    for part in reversed(parts[:-1]):
        result = node_hash(_checked(source.perfect(*part), part), result)
    return result


def _checked(value: bytes, part: tuple[int, int]) -> bytes:
    _check_hash(value, f"subtree hash (level {part[0]}, index {part[1]})")
    return value


def _path(range_root: _RangeRoot, index: int, start: int, end: int) -> list[bytes]:
    """PATH(index, D[start:end]): the sibling subtree roots from the leaf up to the range's root."""
    if end - start == 1:
        return []
    middle = start + _split(end - start)
    if index < middle:
        return [*_path(range_root, index, start, middle), range_root(middle, end)]
    return [*_path(range_root, index, middle, end), range_root(start, middle)]


def _subproof(
    range_root: _RangeRoot, count: int, start: int, end: int, *, complete: bool
) -> list[bytes]:
    """SUBPROOF(count, D[start:end], complete): the first tree is D[start:start + count];
    ``complete`` is true while that is still the whole first tree, whose root the verifier holds
    already (so the proof need not carry it)."""
    if start + count == end:
        return [] if complete else [range_root(start, end)]
    split = _split(end - start)
    middle = start + split
    if count <= split:
        return [
            *_subproof(range_root, count, start, middle, complete=complete),
            range_root(middle, end),
        ]
    return [
        *_subproof(range_root, count - split, middle, end, complete=False),
        range_root(start, middle),
    ]


def _check_size(leaf_hashes: Sequence[bytes], size: int) -> None:
    if not 0 <= size <= len(leaf_hashes):
        raise ValueError(f"tree size {size} is outside 0..{len(leaf_hashes)} (the leaves given)")


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ValueError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def _check_proof_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")
