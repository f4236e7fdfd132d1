"""The RFC 9162 Merkle tree against transparency-dev/merkle's vectors and probes
(../shared/fixtures/merkle, see its SOURCE.txt), and against itself for trees up to 70 leaves."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import pytest

from audit.merkle import (
    EMPTY_ROOT,
    CompactTree,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)
from tests.conftest import fixtures_dir

ABSENT = "../shared/fixtures/merkle is absent (CI has it): transparency-dev/merkle vectors"


def merkle_fixtures() -> Path | None:
    shared = fixtures_dir()
    folder = shared / "merkle" / "transparency-dev-merkle" if shared else None
    return folder if folder is not None and folder.is_dir() else None


def reference() -> Path:
    folder = merkle_fixtures()
    if folder is None:
        pytest.skip(ABSENT)
    return folder


# --- reading the Go sources -----------------------------------------------------------------------


def go_function_body(source: str, name: str) -> str:
    """The text of ``func <name>() ... { ... }`` up to its closing brace at the line start."""
    match = re.search(rf"^func {name}\(\)[^{{]*\{{\n(.*?)^\}}$", source, re.MULTILINE | re.DOTALL)
    assert match, f"func {name} not found"
    return match.group(1)


def hex_strings(text: str) -> list[bytes]:
    return [bytes.fromhex(value) for value in re.findall(r'hd\("([0-9a-f]*)"\)', text)]


class Constants:
    """testonly/constants.go: the 8-leaf reference tree."""

    def __init__(self, source: str) -> None:
        self.leaf_inputs = hex_strings(go_function_body(source, "LeafInputs"))
        (self.empty_root,) = hex_strings(go_function_body(source, "EmptyRootHash"))
        # NodeHashes: one innermost {...} block per level, leaves first.
        self.node_hashes = [
            hex_strings(block)
            for block in re.findall(r"\{([^{}]*)\}", go_function_body(source, "NodeHashes"))
        ]
        # RootHashes: EmptyRootHash() for size 0, then hd("...") for sizes 1..8.
        self.root_hashes = [
            self.empty_root if item == "EmptyRootHash()" else bytes.fromhex(value)
            for item, value in re.findall(
                r'(EmptyRootHash\(\)|hd\("([0-9a-f]+)"\))', go_function_body(source, "RootHashes")
            )
        ]
        # CompactTrees: "nil" or {nh[level][index], ...} per tree size.
        self.compact_trees = [
            [
                self.node_hashes[int(level)][int(index)]
                for level, index in re.findall(r"nh\[(\d+)\]\[(\d+)\]", line)
            ]
            for line in go_function_body(source, "CompactTrees").splitlines()
            if line.strip().startswith(("nil", "{"))
        ]


@pytest.fixture(scope="module")
def constants() -> Constants:
    parsed = Constants((reference() / "testonly" / "constants.go").read_text())
    # Guard the parsing itself: a regex that silently found nothing would make the tests vacuous.
    assert len(parsed.leaf_inputs) == 8
    assert [len(level) for level in parsed.node_hashes] == [8, 4, 2, 1]
    assert len(parsed.root_hashes) == 9
    assert len(parsed.compact_trees) == 9
    return parsed


def leaf_hashes_of(constants: Constants) -> list[bytes]:
    return [leaf_hash(data) for data in constants.leaf_inputs]


# --- hashing --------------------------------------------------------------------------------------


def test_the_rfc6962_hasher_vectors() -> None:
    source = (reference() / "rfc6962" / "rfc6962_test.go").read_text()
    wanted = dict(re.findall(r'desc: "([^"]+)",\s*want: "([0-9a-f]{64})"', source))
    ours = {
        "RFC6962 Empty": root([]),
        "RFC6962 Empty Leaf": leaf_hash(b""),
        "RFC6962 Leaf": leaf_hash(b"L123456"),
        "RFC6962 Node": node_hash(b"N123", b"N456"),
    }
    assert set(wanted) == set(ours)
    for desc, value in ours.items():
        assert value.hex() == wanted[desc], desc


def test_leaf_and_node_hashes_are_domain_separated_and_ordered() -> None:
    # rfc6962_test.go's TestRFC6962HasherCollisions: a node is never a leaf of its children's
    # concatenation, and the order of the children matters.
    one, other = leaf_hash(b"Hello"), leaf_hash(b"World")
    assert one != other
    assert node_hash(one, other) != leaf_hash(one + other)
    assert node_hash(one, other) != node_hash(other, one)


def test_the_empty_tree_root_is_sha256_of_nothing(constants: Constants) -> None:
    assert EMPTY_ROOT == hashlib.sha256(b"").digest() == constants.empty_root
    assert root([]) == EMPTY_ROOT
    assert CompactTree().root() == EMPTY_ROOT


def test_roots_of_the_reference_tree_for_sizes_0_to_8(constants: Constants) -> None:
    hashes = leaf_hashes_of(constants)
    for size, expected in enumerate(constants.root_hashes):
        assert root(hashes, size) == expected, size
        assert root(hashes[:size]) == expected, size


def test_every_perfect_subtree_of_the_reference_tree(constants: Constants) -> None:
    hashes = leaf_hashes_of(constants)
    for level, row in enumerate(constants.node_hashes):
        width = 1 << level
        for index, expected in enumerate(row):
            assert root(hashes[index * width : (index + 1) * width]) == expected, (level, index)


def test_the_compact_tree_keeps_the_reference_subtree_roots(constants: Constants) -> None:
    tree = CompactTree()
    for size, expected in enumerate(constants.compact_trees):
        assert tree.size == size
        assert list(tree.hashes) == expected, size
        assert tree.root() == constants.root_hashes[size], size
        if size < 8:
            tree.append(leaf_hash(constants.leaf_inputs[size]))


# --- the probes -----------------------------------------------------------------------------------


def probe_files(kind: str) -> list[Any]:
    folder = merkle_fixtures()
    if folder is None:
        # One placeholder that skips with the reason, instead of an empty, silent parameter set.
        return [pytest.param(None, id=f"{kind}-absent")]
    base = folder / "testdata"
    files = sorted((base / kind).rglob("*.json"))
    return [pytest.param(path, id=str(path.relative_to(base))) for path in files]


def load_probe(path: Path | None) -> dict[str, Any]:
    if path is None:
        pytest.skip(ABSENT)
    probe: dict[str, Any] = json.loads(path.read_text())
    return probe


def b64(value: str) -> bytes:
    return base64.b64decode(value)


def b64_list(values: list[str] | None) -> list[bytes]:
    return [b64(value) for value in values or []]  # Go writes an empty proof as null or []


def test_all_probes_are_there() -> None:
    base = reference() / "testdata"
    assert len(list((base / "inclusion").rglob("*.json"))) == 98
    assert len(list((base / "consistency").rglob("*.json"))) == 98


@pytest.mark.parametrize("path", probe_files("inclusion"))
def test_inclusion_probe(path: Path | None) -> None:
    probe = load_probe(path)
    arguments = (
        b64(probe["leafHash"]),
        probe["leafIdx"],
        probe["treeSize"],
        b64_list(probe["proof"]),
        b64(probe["root"]),
    )
    if probe["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*arguments)
    else:
        verify_inclusion(*arguments)


@pytest.mark.parametrize("path", probe_files("consistency"))
def test_consistency_probe(path: Path | None) -> None:
    probe = load_probe(path)
    arguments = (
        probe["size1"],
        probe["size2"],
        b64_list(probe["proof"]),
        b64(probe["root1"]),
        b64(probe["root2"]),
    )
    if probe["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*arguments)
    else:
        verify_consistency(*arguments)


@pytest.mark.parametrize("folder", ["0", "1", "2", "3", "4"])
def test_our_inclusion_proofs_are_the_reference_ones(constants: Constants, folder: str) -> None:
    probe = load_probe(reference() / "testdata" / "inclusion" / folder / "happy-path.json")
    hashes = leaf_hashes_of(constants)
    index, size = probe["leafIdx"], probe["treeSize"]
    assert b64(probe["leafHash"]) == hashes[index]
    assert b64(probe["root"]) == root(hashes, size)
    proof = inclusion_proof(hashes, index, size)
    assert proof == b64_list(probe["proof"])
    verify_inclusion(hashes[index], index, size, proof, root(hashes, size))


@pytest.mark.parametrize("folder", ["0", "1", "2", "3", "4"])
def test_our_consistency_proofs_are_the_reference_ones(constants: Constants, folder: str) -> None:
    probe = load_probe(reference() / "testdata" / "consistency" / folder / "happy-path.json")
    hashes = leaf_hashes_of(constants)
    size1, size2 = probe["size1"], probe["size2"]
    assert b64(probe["root1"]) == root(hashes, size1)
    assert b64(probe["root2"]) == root(hashes, size2)
    proof = consistency_proof(hashes, size1, size2)
    assert proof == b64_list(probe["proof"])
    verify_consistency(size1, size2, proof, root(hashes, size1), root(hashes, size2))


# --- against itself: random trees up to 70 leaves -------------------------------------------------


def random_leaf_hashes(count: int, seed: int = 9162) -> list[bytes]:
    rng = random.Random(seed)
    return [leaf_hash(rng.randbytes(rng.randrange(0, 40))) for _ in range(count)]


def flipped(value: bytes, position: int = 0) -> bytes:
    changed = bytearray(value)
    changed[position] ^= 0x01
    return bytes(changed)


def test_the_compact_tree_has_the_root_of_every_size_up_to_70() -> None:
    hashes = random_leaf_hashes(70)
    tree = CompactTree()
    assert tree.root() == root(hashes, 0)
    for size in range(1, 71):
        tree.append(hashes[size - 1])
        assert tree.size == size
        # At most one stored hash per set bit of the size: the frontier, never the leaves.
        assert len(tree.hashes) == size.bit_count()
        assert tree.root() == root(hashes, size), size


def test_the_compact_tree_resumes_from_its_json_state() -> None:
    hashes = random_leaf_hashes(70)
    tree = CompactTree()
    for size in range(71):
        state = json.loads(json.dumps(tree.to_dict()))
        resumed = CompactTree.from_dict(state)
        assert (resumed.size, resumed.hashes, resumed.root()) == (
            tree.size,
            tree.hashes,
            tree.root(),
        )
        # The resumed tree goes on exactly as the original would have.
        for leaf in hashes[size:]:
            resumed.append(leaf)
        assert resumed.root() == root(hashes)
        if size < 70:
            tree.append(hashes[size])


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ({"size": 3, "hashes": ["00" * 32]}, "has 2 subtree hashes"),
        ({"size": 1, "hashes": ["00" * 31]}, "31 bytes"),
        ({"size": 1, "hashes": ["zz" * 32]}, "not hex"),
        ({"size": -1, "hashes": []}, "non-negative"),
        ({"size": True, "hashes": ["00" * 32]}, "non-negative"),
        ({"size": 1, "hashes": [b"\x00" * 32]}, "hex strings"),
        ({"hashes": []}, "non-negative"),
    ],
)
def test_a_corrupt_compact_tree_state_is_refused(state: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        CompactTree.from_dict(state)


def test_a_hash_of_the_wrong_length_is_not_a_leaf() -> None:
    with pytest.raises(ValueError, match="31 bytes"):
        CompactTree().append(b"\x00" * 31)
    with pytest.raises(ValueError, match="leaf hash #1"):
        root([leaf_hash(b"a"), b"raw leaf, not its hash"])


def test_every_inclusion_proof_up_to_70_leaves_verifies_and_no_flipped_byte_does() -> None:
    hashes = random_leaf_hashes(70)
    for size in range(1, 71):
        tree_root = root(hashes, size)
        for index in range(size):
            proof = inclusion_proof(hashes, index, size)
            verify_inclusion(hashes[index], index, size, proof, tree_root)
            with pytest.raises(ProofError):
                verify_inclusion(flipped(hashes[index]), index, size, proof, tree_root)
            with pytest.raises(ProofError):
                verify_inclusion(hashes[index], index, size, proof, flipped(tree_root, 31))
            for position in range(len(proof)):
                tampered = [*proof]
                tampered[position] = flipped(proof[position], position)
                with pytest.raises(ProofError):
                    verify_inclusion(hashes[index], index, size, tampered, tree_root)


def test_every_consistency_proof_up_to_70_leaves_verifies_and_no_flipped_byte_does() -> None:
    hashes = random_leaf_hashes(70)
    roots = [root(hashes, size) for size in range(71)]
    for size2 in range(1, 71):
        for size1 in range(1, size2 + 1):
            proof = consistency_proof(hashes, size1, size2)
            verify_consistency(size1, size2, proof, roots[size1], roots[size2])
            with pytest.raises(ProofError):
                verify_consistency(size1, size2, proof, flipped(roots[size1]), roots[size2])
            with pytest.raises(ProofError):
                verify_consistency(size1, size2, proof, roots[size1], flipped(roots[size2]))
            for position in range(len(proof)):
                tampered = [*proof]
                tampered[position] = flipped(proof[position], position)
                with pytest.raises(ProofError):
                    verify_consistency(size1, size2, tampered, roots[size1], roots[size2])


def test_a_proof_for_other_sizes_does_not_verify() -> None:
    hashes = random_leaf_hashes(70)
    proof = consistency_proof(hashes, 6, 8)
    with pytest.raises(ProofError):
        verify_consistency(6, 9, proof, root(hashes, 6), root(hashes, 9))
    path = inclusion_proof(hashes, 5, 8)
    with pytest.raises(ProofError):
        verify_inclusion(hashes[5], 5, 9, path, root(hashes, 9))


def test_verification_failures_say_why() -> None:
    hashes = random_leaf_hashes(8)
    proof = inclusion_proof(hashes, 5, 8)
    with pytest.raises(ProofError, match="32"):
        verify_inclusion(b"", 0, 1, [], EMPTY_ROOT)
    with pytest.raises(ProofError, match="not below the tree size"):
        verify_inclusion(hashes[0], 8, 8, proof, root(hashes))
    with pytest.raises(ProofError, match="longer"):
        verify_inclusion(hashes[5], 5, 8, [*proof, proof[0]], root(hashes))
    with pytest.raises(ProofError, match="shorter"):
        verify_inclusion(hashes[5], 5, 8, proof[:-1], root(hashes))
    with pytest.raises(ProofError, match="different root"):
        verify_inclusion(hashes[4], 5, 8, proof, root(hashes))
    with pytest.raises(ProofError, match="meaningless"):
        verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)
    with pytest.raises(ProofError, match="smaller"):
        verify_consistency(2, 1, [], root(hashes, 2), root(hashes, 1))
    with pytest.raises(ProofError, match="must be empty"):
        verify_consistency(3, 3, [hashes[0]], root(hashes, 3), root(hashes, 3))
    with pytest.raises(ProofError, match="empty"):
        verify_consistency(3, 5, [], root(hashes, 3), root(hashes, 5))
    verify_consistency(3, 3, [], root(hashes, 3), root(hashes, 3))


def test_no_proof_is_made_from_impossible_arguments() -> None:
    hashes = random_leaf_hashes(8)
    with pytest.raises(ValueError, match="not in a tree"):
        inclusion_proof(hashes, 8, 8)
    with pytest.raises(ValueError, match="outside"):
        inclusion_proof(hashes, 0, 9)
    with pytest.raises(ValueError, match="no consistency proof"):
        consistency_proof(hashes, 0, 8)
    with pytest.raises(ValueError, match="no consistency proof"):
        consistency_proof(hashes, 5, 4)
    assert consistency_proof(hashes, 8, 8) == []


class IndexOnly(Sequence[bytes]):
    """Leaf hashes as the store will give them: indexable, but never to be copied or walked."""

    def __init__(self, hashes: list[bytes]) -> None:
        self._hashes = hashes
        self.reads = 0

    def __len__(self) -> int:
        return len(self._hashes)

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            raise AssertionError("sliced: a store-backed sequence must only be indexed")
        self.reads += 1
        return self._hashes[index]

    def __iter__(self) -> Iterator[bytes]:
        raise AssertionError("iterated: a store-backed sequence must only be indexed")


def test_proofs_only_index_the_leaf_hashes() -> None:
    hashes = random_leaf_hashes(70)
    lazy = IndexOnly(hashes)
    assert root(lazy, 45) == root(hashes, 45)
    assert inclusion_proof(lazy, 17, 45) == inclusion_proof(hashes, 17, 45)
    assert consistency_proof(lazy, 13, 45) == consistency_proof(hashes, 13, 45)
    assert lazy.reads > 0
