"""Proofs from stored subtrees (what the sealer keeps) against the proofs from every leaf hash and
against the reference vectors; the leaf encoding; evidence bundles checked offline."""

from __future__ import annotations

import base64
import copy
import random
from typing import Any
from uuid import UUID

import pytest

from audit.bundle import (
    LEAF_HEADER,
    BundleError,
    Record,
    check_bundle,
    evidence_bundle,
    record_leaf,
    record_leaf_hash,
)
from audit.merkle import (
    CompactTree,
    consistency_proof,
    consistency_proof_from,
    inclusion_proof,
    inclusion_proof_from,
    leaf_hash,
    perfect_subtrees,
    root,
    root_from,
)
from audit.note import NoteSigner, checkpoint_body, sign_note
from tests.unit.test_merkle import (
    Constants,
    b64,
    b64_list,
    leaf_hashes_of,
    load_probe,
    reference,
)
from tests.unit.test_merkle import constants as constants


class StoredSubtrees:
    """A ``SubtreeSource`` as the sealer builds it: the leaf hashes and each perfect subtree the
    compact tree completed, counting how many it was asked for."""

    def __init__(self, leaf_hashes: list[bytes]) -> None:
        self.hashes: dict[tuple[int, int], bytes] = {}
        tree = CompactTree()
        for index, value in enumerate(leaf_hashes):
            self.hashes[(0, index)] = value
            for node in tree.append(value):
                self.hashes[(node.level, node.index)] = node.hash
        self.lookups = 0

    def perfect(self, level: int, index: int) -> bytes:
        self.lookups += 1
        return self.hashes[(level, index)]


def random_leaf_hashes(count: int, seed: int = 6962) -> list[bytes]:
    rng = random.Random(seed)
    return [leaf_hash(rng.randbytes(rng.randrange(0, 40))) for _ in range(count)]


def test_the_compact_tree_hands_over_each_perfect_subtree_as_it_completes() -> None:
    hashes = random_leaf_hashes(300)
    source = StoredSubtrees(hashes)
    # Every perfect subtree of the 300 leaves, and no other: 150 + 75 + 37 + 18 + 9 + 4 + 2 + 1.
    assert len(source.hashes) - 300 == 150 + 75 + 37 + 18 + 9 + 4 + 2 + 1
    for (level, index), value in source.hashes.items():
        assert value == root(hashes[index << level : (index + 1) << level])


def test_a_range_is_one_perfect_subtree_per_bit_of_its_length() -> None:
    assert perfect_subtrees(0, 13) == [(3, 0), (2, 2), (0, 12)]
    assert perfect_subtrees(8, 11) == [(1, 4), (0, 10)]
    with pytest.raises(ValueError, match="not a range"):
        perfect_subtrees(3, 7)
    with pytest.raises(ValueError, match="non-empty"):
        perfect_subtrees(4, 4)


def test_roots_inclusion_proofs_from_stored_subtrees_are_those_from_every_leaf_up_to_130() -> None:
    hashes = random_leaf_hashes(130)
    source = StoredSubtrees(hashes)
    for size in range(0, 131):
        assert root_from(source, size) == root(hashes, size)
        for index in range(size):
            assert inclusion_proof_from(source, index, size) == inclusion_proof(hashes, index, size)


def test_consistency_proofs_from_stored_subtrees_are_those_from_every_leaf() -> None:
    hashes = random_leaf_hashes(90)
    source = StoredSubtrees(hashes)
    for size2 in range(1, 91):
        for size1 in range(1, size2 + 1):
            assert consistency_proof_from(source, size1, size2) == consistency_proof(
                hashes, size1, size2
            )


def test_and_on_large_random_trees_with_few_lookups() -> None:
    hashes = random_leaf_hashes(5_000)
    source = StoredSubtrees(hashes)
    rng = random.Random(1)
    for _ in range(60):
        size = rng.randrange(1, 5_001)
        index = rng.randrange(size)
        source.lookups = 0
        assert inclusion_proof_from(source, index, size) == inclusion_proof(hashes, index, size)
        # O(log² n) at most (13 levels here), never O(n).
        assert source.lookups <= 13 * 13
        size1 = rng.randrange(1, size + 1)
        assert consistency_proof_from(source, size1, size) == consistency_proof(hashes, size1, size)


@pytest.mark.parametrize("folder", ["0", "1", "2", "3", "4"])
def test_proofs_from_stored_subtrees_are_the_reference_ones(
    constants: Constants,
    folder: str,
) -> None:
    source = StoredSubtrees(leaf_hashes_of(constants))
    inclusion = load_probe(reference() / "testdata" / "inclusion" / folder / "happy-path.json")
    assert inclusion_proof_from(source, inclusion["leafIdx"], inclusion["treeSize"]) == b64_list(
        inclusion["proof"]
    )
    assert root_from(source, inclusion["treeSize"]) == b64(inclusion["root"])
    consistency = load_probe(reference() / "testdata" / "consistency" / folder / "happy-path.json")
    assert consistency_proof_from(source, consistency["size1"], consistency["size2"]) == b64_list(
        consistency["proof"]
    )


def test_every_reference_root_from_stored_subtrees(constants: Constants) -> None:
    source = StoredSubtrees(leaf_hashes_of(constants))
    assert [root_from(source, size) for size in range(9)] == constants.root_hashes


# --- the leaf encoding ---------------------------------------------------------------------------

RECORD = Record(
    position=258,
    originator_id=UUID("00112233-4455-6677-8899-aabbccddeeff"),
    originator_version=3,
    topic="hub.domain:Machine.ExecutionReported",
    state=b'{"execution":"ACTIVE"}',
)


def test_the_leaf_encoding_is_the_documented_one_byte_for_byte() -> None:
    topic = RECORD.topic.encode()
    expected = (
        b"mes-hub-leaf-v1\n"
        + bytes.fromhex("0000000000000102")
        + bytes.fromhex("00112233445566778899aabbccddeeff")
        + bytes.fromhex("0000000000000003")
        + len(topic).to_bytes(4, "big")
        + topic
        + b'{"execution":"ACTIVE"}'
    )
    assert LEAF_HEADER == b"mes-hub-leaf-v1\n"
    assert record_leaf(RECORD) == expected
    assert record_leaf_hash(RECORD) == leaf_hash(expected)


def test_every_field_of_a_record_changes_its_leaf() -> None:
    changed = [
        Record(259, RECORD.originator_id, 3, RECORD.topic, RECORD.state),
        Record(258, UUID(int=1), 3, RECORD.topic, RECORD.state),
        Record(258, RECORD.originator_id, 4, RECORD.topic, RECORD.state),
        Record(258, RECORD.originator_id, 3, RECORD.topic + "x", RECORD.state),
        Record(258, RECORD.originator_id, 3, RECORD.topic, RECORD.state + b" "),
        # The topic's length is part of the leaf: bytes cannot move from the topic to the state.
        Record(258, RECORD.originator_id, 3, RECORD.topic[:-1], b"d" + RECORD.state),
    ]
    hashes = {record_leaf_hash(record) for record in changed}
    assert len(hashes) == len(changed) and record_leaf_hash(RECORD) not in hashes


# --- evidence bundles ---------------------------------------------------------------------------


def bundle_of(records: list[Record], index: int, signer: NoteSigner) -> dict[str, Any]:
    hashes = [record_leaf_hash(r) for r in records]
    note = sign_note(checkpoint_body("mes-hub/test", len(hashes), root(hashes)), signer)
    proof = inclusion_proof(hashes, index, len(hashes))
    return evidence_bundle(
        records[index], index, len(hashes), proof, note, signer.verifier.key_string()
    )


@pytest.fixture
def signed() -> tuple[dict[str, Any], NoteSigner]:
    signer = NoteSigner.generate("mes-hub/test")
    records = [Record(n, UUID(int=n), 1, "t", f"state {n}".encode()) for n in range(1, 12)]
    return bundle_of(records, 6, signer), signer


def test_a_bundle_checks_with_the_hub_key(signed: tuple[dict[str, Any], NoteSigner]) -> None:
    bundle, signer = signed
    checked = check_bundle(bundle, signer.verifier)
    assert (checked.record.position, checked.leaf_index, checked.checkpoint.size) == (7, 6, 11)


def _flip_b64(value: str) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("tamper", "names"),
    [
        (lambda b: b["record"].update(state=_flip_b64(b["record"]["state"])), "the record"),
        (lambda b: b["record"].update(position=8), "the record"),
        (lambda b: b.update(leaf_hash=None) or b["record"].update(topic="u"), "inclusion proof"),
        (lambda b: b.update(leaf_index=5), "the inclusion proof"),
        (
            lambda b: b["inclusion_proof"].__setitem__(1, _flip_b64(b["inclusion_proof"][1])),
            "the inclusion proof",
        ),
        (lambda b: b["inclusion_proof"].pop(), "the inclusion proof"),
        (lambda b: b.update(tree_size=10), "the tree size"),
        (
            lambda b: b.update(checkpoint=b["checkpoint"].replace("\n11\n", "\n12\n")),
            "the checkpoint's signature",
        ),
        (lambda b: b.update(format="other"), "format"),
    ],
)
def test_a_tampered_bundle_fails_naming_what(
    signed: tuple[dict[str, Any], NoteSigner], tamper: Any, names: str
) -> None:
    bundle, signer = signed
    changed = copy.deepcopy(bundle)
    tamper(changed)
    with pytest.raises(BundleError, match=names):
        check_bundle(changed, signer.verifier)


def test_a_bundle_does_not_check_with_another_key(
    signed: tuple[dict[str, Any], NoteSigner],
) -> None:
    bundle, hub = signed
    other = NoteSigner.generate("mes-hub/test")
    with pytest.raises(BundleError, match="the checkpoint's signature"):
        check_bundle(bundle, other.verifier)
    # A bundle re-signed by another key, carrying that key, still fails with the hub's key.
    forged = bundle_of([Record(1, UUID(int=1), 1, "t", b"x")], 0, other)
    assert forged["public_key"] == other.verifier.key_string()
    assert check_bundle(forged, other.verifier).leaf_index == 0  # (a well-made bundle)
    with pytest.raises(BundleError, match="the checkpoint's signature"):
        check_bundle(forged, hub.verifier)


def test_a_bundle_of_another_origin_fails_when_one_is_expected(
    signed: tuple[dict[str, Any], NoteSigner],
) -> None:
    bundle, signer = signed
    assert check_bundle(bundle, signer.verifier).checkpoint.origin == "mes-hub/test"
    assert check_bundle(bundle, signer.verifier, origin="mes-hub/test").leaf_index == 6
    with pytest.raises(BundleError, match="the checkpoint's origin: 'mes-hub/test', not"):
        check_bundle(bundle, signer.verifier, origin="mes-hub/plant-7")
