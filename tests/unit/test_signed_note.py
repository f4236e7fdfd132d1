"""Signed notes and checkpoints against Go's golang.org/x/mod/sumdb/note and sumdb/tlog test
vectors and the C2SP spec examples (../shared/fixtures/merkle, see its SOURCE.txt)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest

from audit.merkle import CompactTree, leaf_hash
from audit.note import (
    Checkpoint,
    InvalidSignatureError,
    NoteError,
    NoteSigner,
    NoteVerifier,
    UnverifiedNoteError,
    checkpoint_body,
    key_id,
    open_note,
    parse_checkpoint,
    sign_note,
)
from tests.conftest import fixtures_dir


def merkle_fixtures() -> Path:
    shared = fixtures_dir()
    folder = shared / "merkle" if shared else None
    if folder is None or not folder.is_dir():
        pytest.skip("../shared/fixtures/merkle is absent (CI has it): Go note vectors, C2SP specs")
    return folder


_GO_LITERAL = r'"(?:[^"\\]|\\.)*"|`[^`]*`'  # an interpreted "..." or a raw `...` string


def go_string(source: str, variable: str) -> str:
    """The value of the first ``<variable> := <literal> + <literal> ...`` in ``source``."""
    match = re.search(rf"\b{variable} := ((?:{_GO_LITERAL})(?:\s*\+\s*(?:{_GO_LITERAL}))*)", source)
    assert match, f"{variable} not found"
    # The interpreted literals here only use JSON's escapes (\n, \"); raw ones have none.
    return "".join(
        literal[1:-1] if literal.startswith("`") else json.loads(literal)
        for literal in re.findall(_GO_LITERAL, match.group(1))
    )


class GoVectors:
    """sumdb/note/note_test.go's keys and signatures (first assignment of each name)."""

    def __init__(self, source: str) -> None:
        self.peter_vkey = go_string(source, "vkey")
        self.peter_skey = go_string(source, "skey")
        self.enoch_vkey = go_string(source, "enochKey")
        self.peter_sig = go_string(source, "peterSig")  # "— PeterNeumann ...\n"
        self.enoch_sig = go_string(source, "enochSig")
        self.text = go_string(source, "text")  # TestSign's concatenated literal
        self.signed = go_string(source, "want")  # TestSign's expected note
        self.bad_vkeys = re.findall(r'badKey\("([^"]+)"\)', source)


@pytest.fixture(scope="module")
def go() -> GoVectors:
    vectors = GoVectors((merkle_fixtures() / "golang-mod/sumdb/note/note_test.go").read_text())
    # TestSign builds text by concatenation; TestOpen spells the same text as a raw literal.
    assert vectors.text.endswith("your problem is.\n") and vectors.text.count("\n") == 2
    assert vectors.signed == vectors.text + "\n" + vectors.peter_sig
    assert len(vectors.bad_vkeys) == 2
    return vectors


@pytest.fixture(scope="module")
def peter(go: GoVectors) -> NoteVerifier:
    return NoteVerifier.from_key_string(go.peter_vkey)


@pytest.fixture(scope="module")
def enoch(go: GoVectors) -> NoteVerifier:
    return NoteVerifier.from_key_string(go.enoch_vkey)


# --- keys -----------------------------------------------------------------------------------------


def test_the_go_verifier_keys_parse_and_round_trip(go: GoVectors, peter: NoteVerifier) -> None:
    assert peter.name == "PeterNeumann"
    assert peter.key_id == 0xC74F20A3
    assert peter.key_string() == go.peter_vkey
    enoch = NoteVerifier.from_key_string(go.enoch_vkey)
    assert (enoch.name, enoch.key_id) == ("EnochRoot", 0xAF0CFE78)
    assert enoch.key_string() == go.enoch_vkey


def test_the_key_id_is_the_spec_hash(peter: NoteVerifier) -> None:
    # signed-note: key ID = SHA-256(key name || 0x0A || 0x01 || 32-byte public key)[:4]
    digest = hashlib.sha256(b"PeterNeumann\n\x01" + peter.public_key).digest()
    assert key_id("PeterNeumann", peter.public_key) == int.from_bytes(digest[:4], "big")
    assert peter.key_id == 0xC74F20A3


def test_the_go_signer_key_parses_and_round_trips(go: GoVectors) -> None:
    signer = NoteSigner.from_key_string(go.peter_skey)
    assert (signer.name, signer.key_id) == ("PeterNeumann", 0xC74F20A3)
    assert signer.verifier.key_string() == go.peter_vkey
    assert signer.key_string() == go.peter_skey


def test_go_example_key_from_a_zero_seed(go: GoVectors) -> None:
    # example_test.go: GenerateKey reads its seed from a reader of zeros, giving EnochRoot's key.
    signer = NoteSigner("EnochRoot", bytes(32))
    assert signer.verifier.key_string() == go.enoch_vkey
    assert sign_note(go.text, signer) == go.text + "\n" + go.enoch_sig


def mangled(key: str) -> list[str]:
    """What TestNewVerifier / TestNewSigner try: every proper substring, every character + 1."""
    cut = [key[i:j] for i in range(len(key) + 1) for j in range(i + 1, len(key) + 1)]
    bumped = [key[:i] + chr(ord(key[i]) + 1) + key[i + 1 :] for i in range(len(key))]
    return [value for value in cut + bumped if value != key]


def test_every_mangled_verifier_key_is_refused(go: GoVectors) -> None:
    accepted = []
    for value in mangled(go.peter_vkey):
        try:
            NoteVerifier.from_key_string(value)
        except NoteError:
            continue
        accepted.append(value)
    assert accepted == []


def test_every_mangled_signer_key_is_refused(go: GoVectors) -> None:
    accepted = []
    for value in mangled(go.peter_skey):
        try:
            NoteSigner.from_key_string(value)
        except NoteError:
            continue
        accepted.append(value)
    assert accepted == []


def test_a_wrong_length_key_and_an_unknown_algorithm_are_refused(go: GoVectors) -> None:
    # TestNewVerifier's two keys whose key ids were adjusted to match: refused for the key itself.
    wrong_length, unknown_algorithm = go.bad_vkeys
    # Its "...BADKEY==" is also non-canonical base64 (spare bits set), refused before its length.
    with pytest.raises(NoteError, match="not base64"):
        NoteVerifier.from_key_string(wrong_length)
    with pytest.raises(NoteError, match="not an Ed25519 key"):
        NoteVerifier.from_key_string(unknown_algorithm)
    # So the length on its own: a canonical 33-byte key with its matching id.
    long_key = NoteVerifier.from_key_string(go.peter_vkey).public_key + b"\x00"
    encoded = base64.b64encode(b"\x01" + long_key).decode()
    with pytest.raises(NoteError, match="not 32 bytes"):
        NoteVerifier.from_key_string(
            f"PeterNeumann+{key_id('PeterNeumann', long_key):08x}+{encoded}"
        )


def test_signer_errors_and_repr_never_show_the_private_key(go: GoVectors) -> None:
    seed = go.peter_skey.split("+", 4)[4]  # base64(0x01 || seed); it holds a "+" itself
    assert NoteSigner.from_key_string(go.peter_skey).key_string().endswith(seed)
    assert seed[:8] not in repr(NoteSigner.from_key_string(go.peter_skey))
    for wrong in [go.peter_skey.replace("c74f20a3", "c74f20a4"), go.peter_skey + "A"]:
        with pytest.raises(NoteError) as refused:
            NoteSigner.from_key_string(wrong)
        assert seed[:8] not in str(refused.value)


def test_generated_keys_round_trip() -> None:
    signer = NoteSigner.generate("mes-hub.example/plant-1")
    again = NoteSigner.from_key_string(signer.key_string())
    assert again.verifier == signer.verifier
    verifier = NoteVerifier.from_key_string(signer.verifier.key_string())
    assert open_note(sign_note("hello\n", again), [verifier]) == "hello\n"


@pytest.mark.parametrize("name", ["", "a+b", "a b", "a\u00a0b", "tab\there"])
def test_invalid_key_names_are_refused(name: str) -> None:
    with pytest.raises(NoteError, match="key name"):
        NoteSigner(name, bytes(32))


# --- signing and opening --------------------------------------------------------------------------


def test_signing_the_go_vector_reproduces_its_signature(go: GoVectors) -> None:
    # Ed25519 is deterministic: the same key and text give the same signature line.
    signer = NoteSigner.from_key_string(go.peter_skey)
    assert sign_note(go.text, signer) == go.signed


def test_the_go_note_opens(go: GoVectors, peter: NoteVerifier, enoch: NoteVerifier) -> None:
    note = go.text + "\n" + go.peter_sig + go.enoch_sig
    assert open_note(note, [peter]) == go.text  # Enoch's signature: unknown, so ignored
    assert open_note(note, [peter, enoch]) == go.text
    assert open_note(note.encode("utf-8"), [enoch]) == go.text


def test_a_note_without_a_known_signature_is_refused(
    go: GoVectors, peter: NoteVerifier, enoch: NoteVerifier
) -> None:
    note = go.text + "\n" + go.peter_sig + go.enoch_sig
    with pytest.raises(UnverifiedNoteError, match="no signature by a known key"):
        open_note(note, [])
    stranger = NoteSigner.generate("PeterNeumann")  # same name, another key: still unknown
    with pytest.raises(UnverifiedNoteError):
        open_note(sign_note(go.text, stranger), [peter, enoch])


def test_a_signature_with_a_wrong_key_id_is_not_peters(go: GoVectors, peter: NoteVerifier) -> None:
    name, encoded = go.peter_sig.removeprefix("\N{EM DASH} ").split(" ")
    raw = bytearray(base64.b64decode(encoded))
    raw[3] ^= 0x01  # the key id's last byte; the Ed25519 signature itself is untouched
    line = f"\N{EM DASH} {name} {base64.b64encode(bytes(raw)).decode()}\n"
    with pytest.raises(UnverifiedNoteError):
        open_note(go.text + "\n" + line, [peter])


def test_a_tampered_text_is_refused(go: GoVectors, peter: NoteVerifier) -> None:
    tampered = go.signed.replace("your problem is", "your problems are")
    with pytest.raises(InvalidSignatureError, match=r"invalid signature for key PeterNeumann\+"):
        open_note(tampered, [peter])


def test_a_broken_signature_by_a_known_key_refuses_the_note(
    go: GoVectors, peter: NoteVerifier
) -> None:
    # TestOpen: four base64 characters inserted into Peter's signature.
    broken = go.peter_sig[:60] + "ABCD" + go.peter_sig[60:]
    with pytest.raises(InvalidSignatureError, match="PeterNeumann"):
        open_note(go.text + "\n" + broken, [peter])
    # ...even when another known key signed correctly.
    with pytest.raises(InvalidSignatureError):
        open_note(go.text + "\n" + broken + go.peter_sig, [peter])


def test_repeated_and_unverifiable_signatures(go: GoVectors, peter: NoteVerifier) -> None:
    # TestOpen: duplicates of a verified signature and broken signatures by unknown keys.
    broken_enoch = go.enoch_sig[:60] + "ABCD" + go.enoch_sig[60:]
    note = go.text + "\n" + go.peter_sig * 2 + go.enoch_sig * 2 + broken_enoch
    assert open_note(note, [peter]) == go.text


def test_a_key_given_twice_is_ambiguous_when_used(
    go: GoVectors, peter: NoteVerifier, enoch: NoteVerifier
) -> None:
    with pytest.raises(NoteError, match=r"ambiguous key EnochRoot\+af0cfe78"):
        open_note(go.text + "\n" + go.enoch_sig, [enoch, peter, enoch])
    assert open_note(go.text + "\n" + go.peter_sig, [enoch, peter, enoch]) == go.text


def test_too_many_signatures_are_refused(go: GoVectors, peter: NoteVerifier) -> None:
    with pytest.raises(NoteError, match="more than 100"):
        open_note(go.text + "\n" + go.peter_sig * 101, [peter])
    assert open_note(go.text + "\n" + go.peter_sig * 100, [peter]) == go.text


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("text only", "no blank line"),
        ("no signature lines", "no signature lines"),
        ("no final newline", "does not end with a newline"),
        ("control character", "control character"),
        ("not UTF-8", "not UTF-8"),
        ("name with a space", "not '— <name> <base64>'"),
        ("a line after the signatures", "does not start with an em dash"),
        ("a hyphen, not an em dash", "does not start with an em dash"),
        ("signature too short", "not '— <name> <base64>'"),
    ],
)
def test_malformed_notes_are_refused(
    go: GoVectors, peter: NoteVerifier, case: str, reason: str
) -> None:
    # TestOpen's badMsgs, one by one, and a few more.
    text, sig = go.text, go.peter_sig
    notes: dict[str, str | bytes] = {
        "text only": text,
        "no signature lines": text + "\n",
        "no final newline": text + "\n" + sig[:-1],
        "control character": "\x01" + text + "\n" + sig,
        "not UTF-8": b"\xff" + (text + "\n" + sig).encode(),
        "name with a space": text + "\n" + sig.replace("PeterNeumann", "Bad Name"),
        "a line after the signatures": text + "\n" + sig + "Unexpected line.\n",
        "a hyphen, not an em dash": text + "\n" + sig.replace("\N{EM DASH}", "-"),
        "signature too short": text + "\n\N{EM DASH} PeterNeumann AAAAAA==\n",
    }
    with pytest.raises(NoteError, match=reason) as refused:
        open_note(notes[case], [peter])
    assert type(refused.value) is NoteError  # malformed, not merely unverified


def test_a_text_without_a_final_newline_is_not_signed(go: GoVectors) -> None:
    signer = NoteSigner.from_key_string(go.peter_skey)
    with pytest.raises(NoteError, match="must end with a newline"):
        sign_note("abc", signer)
    with pytest.raises(NoteError, match="control character"):
        sign_note("a\tb\n", signer)


def test_a_text_may_hold_blank_lines() -> None:
    # The spec's first example: the signatures start after the LAST blank line.
    signer = NoteSigner.generate("quasimodo.example/salvatore")
    text = (
        "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\n"
        "ed \u00e8 subito sera.\n"
    )
    assert open_note(sign_note(text, signer), [signer.verifier]) == text


def test_the_c2sp_example_note_opens() -> None:
    spec = (merkle_fixtures() / "c2sp" / "signed-note.md").read_text()
    vkey = re.search(r"^    (example\.com/foo\+[0-9a-f]{8}\+\S+)$", spec, re.MULTILINE)
    note = re.search(r"verifies the following signed note\n\n```\n(.*?)```", spec, re.DOTALL)
    assert vkey and note
    verifier = NoteVerifier.from_key_string(vkey.group(1))
    assert verifier.key_id == 0x530D903A
    assert open_note(note.group(1), [verifier]) == "This is an example message.\n"


# --- checkpoints ----------------------------------------------------------------------------------


def test_the_go_tree_note_is_a_checkpoint_body() -> None:
    source = (merkle_fixtures() / "golang-mod/sumdb/tlog/note_test.go").read_text()
    golden = go_string(source, "golden")
    # TestFormatTree: n := int64(123456789012), h := RecordHash([]byte("hello world")), where
    # RecordHash is the RFC 6962 leaf hash.
    body = checkpoint_body("go.sum database tree", 123456789012, leaf_hash(b"hello world"))
    assert body == golden
    assert parse_checkpoint(golden) == Checkpoint(
        "go.sum database tree", 123456789012, leaf_hash(b"hello world")
    )
    # TestParseTree's bad trees; its first, "not-" + another origin, is the caller's check.
    block = re.search(r"var badTrees = \[\]string\{(.*?)\n\t\}", source, re.DOTALL)
    assert block
    bad_size, bad_hash = [
        value
        for value in (json.loads(item) for item in re.findall(r'"(?:[^"\\]|\\.)*"', block[1]))
        if value.startswith("go.sum database tree\n")
    ]
    with pytest.raises(NoteError, match="tree size"):
        parse_checkpoint(bad_size)
    with pytest.raises(NoteError, match="root hash"):
        parse_checkpoint(bad_hash)
    # Its junk on the end is, in a checkpoint, extension lines.
    assert parse_checkpoint(golden + "JOE\n" * 3).extensions == ("JOE", "JOE", "JOE")


def test_the_c2sp_example_checkpoint_parses() -> None:
    spec = (merkle_fixtures() / "c2sp" / "tlog-checkpoint.md").read_text()
    block = re.search(r"```\n(.*?)```", spec, re.DOTALL)
    assert block
    note = block.group(1)
    with pytest.raises(UnverifiedNoteError):  # well-formed; its key is not published
        open_note(note, [])
    checkpoint = parse_checkpoint(note[: note.rindex("\n\n") + 1])
    assert (checkpoint.origin, checkpoint.size) == ("example.com/behind-the-sofa", 20852163)
    assert base64.b64encode(checkpoint.root_hash) == b"CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="


def test_a_signed_checkpoint_round_trips() -> None:
    tree = CompactTree()
    for number in range(11):
        tree.append(leaf_hash(f"event {number}".encode()))
    signer = NoteSigner.generate("mes-hub.example/plant-1")
    checkpoint = Checkpoint("mes-hub.example/plant-1", tree.size, tree.root())
    note = sign_note(checkpoint.body(), signer)
    assert note.startswith(
        f"mes-hub.example/plant-1\n11\n{base64.b64encode(tree.root()).decode()}\n"
    )
    assert parse_checkpoint(open_note(note, [signer.verifier])) == checkpoint
    extended = Checkpoint("o", 0, bytes(32), ("ext one", "ext two"))
    assert parse_checkpoint(extended.body()) == extended


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("o\n1\n" + "A" * 43 + "=", "newline"),
        ("o\n1\n", "three lines"),
        ("\n1\n" + base64.b64encode(bytes(32)).decode() + "\n", "origin"),
        ("o\n01\n" + base64.b64encode(bytes(32)).decode() + "\n", "tree size"),
        ("o\n+1\n" + base64.b64encode(bytes(32)).decode() + "\n", "tree size"),
        ("o\n\u0663\n" + base64.b64encode(bytes(32)).decode() + "\n", "tree size"),  # Arabic 3
        ("o\n1\n" + base64.b64encode(bytes(31)).decode() + "\n", "root hash"),
        ("o\n1\n" + base64.b64encode(bytes(32)).decode()[:-1] + "\n", "root hash"),
        ("o\n1\n" + base64.b64encode(bytes(32)).decode() + "\n\n", "extension"),
    ],
)
def test_malformed_checkpoints_are_refused(text: str, reason: str) -> None:
    with pytest.raises(NoteError, match=reason):
        parse_checkpoint(text)


def test_a_checkpoint_body_is_only_made_of_valid_parts() -> None:
    with pytest.raises(ValueError, match="origin"):
        checkpoint_body("two\nlines", 1, bytes(32))
    with pytest.raises(ValueError, match="origin"):
        checkpoint_body("", 1, bytes(32))
    with pytest.raises(ValueError, match="not negative"):
        checkpoint_body("o", -1, bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        checkpoint_body("o", 1, bytes(31))
    with pytest.raises(ValueError, match="extension"):
        checkpoint_body("o", 1, bytes(32), [""])
