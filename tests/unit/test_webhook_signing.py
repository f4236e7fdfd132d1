"""Webhook signatures as a partner checks them: ``v1`` by the reference ``standardwebhooks``
library, ``v1a`` by ``cryptography``'s Ed25519 directly; never by our own code."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from adapters.webhooks.signing import (
    InvalidSecretError,
    SigningKey,
    headers,
    new_secret,
    sign,
)

BODY = b'{"type":"order.confirmed","data":{"order":"4711","qty":12}}'
MSG_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"

# The fixed vector of the reference libraries' test_sign_function (../shared/fixtures/webhooks).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def now() -> int:
    # The reference verifier refuses timestamps more than 5 minutes from its clock.
    return int(time.time())


def entries(signature: str, version: str) -> list[bytes]:
    return [
        base64.b64decode(value)
        for kind, value in (entry.split(",", 1) for entry in signature.split(" "))
        if kind == version
    ]


def ed25519_verify(public_key: str, signature: bytes, content: bytes) -> None:
    assert public_key.startswith("whpk_")
    raw = base64.b64decode(public_key.removeprefix("whpk_"), validate=True)
    Ed25519PublicKey.from_public_bytes(raw).verify(signature, content)


@pytest.mark.parametrize("secret", [VECTOR_SECRET, VECTOR_SECRET.removeprefix("whsec_")])
def test_the_spec_fixed_vector_is_reproduced(secret: str) -> None:
    assert sign([secret], VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE


def test_the_reference_library_verifies_our_headers() -> None:
    secret = new_secret()
    sent = headers(MSG_ID, now(), BODY, [secret])
    assert sent.keys() == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert sent["webhook-id"] == MSG_ID
    assert Webhook(secret).verify(BODY, sent)["data"]["order"] == "4711"


@pytest.mark.parametrize(
    "secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwBr"]
)
def test_unpadded_secrets_mean_what_they_mean_to_the_reference_library(secret: str) -> None:
    sent = headers(MSG_ID, now(), BODY, [secret])
    Webhook(secret).verify(BODY, sent, json_parse=False)


def test_during_a_rotation_each_secret_alone_verifies() -> None:
    old, new = new_secret(), new_secret()
    sent = headers(MSG_ID, now(), BODY, [old, new])
    assert len(sent["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(BODY, sent, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, sent)


def _other_body(body: bytes, sent: dict[str, str]) -> bytes:
    return body.replace(b"12", b"13")


def _other_id(body: bytes, sent: dict[str, str]) -> bytes:
    sent["webhook-id"] += "x"
    return body


def _other_timestamp(body: bytes, sent: dict[str, str]) -> bytes:
    # A second later: still inside the verifier's tolerance, so only the signature can refuse it.
    sent["webhook-timestamp"] = str(int(sent["webhook-timestamp"]) + 1)
    return body


@pytest.mark.parametrize("tamper", [_other_body, _other_id, _other_timestamp])
def test_a_tampered_delivery_fails(tamper: Callable[[bytes, dict[str, str]], bytes]) -> None:
    secret = new_secret()
    sent = headers(MSG_ID, now(), BODY, [secret])
    body = tamper(BODY, sent)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(secret).verify(body, sent)


def test_v1a_verifies_with_the_published_public_key_beside_v1() -> None:
    secret, key = new_secret(), SigningKey.generate()
    timestamp = now()
    sent = headers(MSG_ID, timestamp, BODY, [secret], signing_key=key)
    signature = sent["webhook-signature"]
    assert [entry.split(",")[0] for entry in signature.split(" ")] == ["v1", "v1a"]

    # standardwebhooks 1.1 checks v1 only and skips the v1a entry beside it.
    Webhook(secret).verify(BODY, sent, json_parse=False)

    (v1a,) = entries(signature, "v1a")
    assert len(v1a) == 64
    content = f"{MSG_ID}.{timestamp}.".encode() + BODY
    ed25519_verify(key.public_key(), v1a, content)
    with pytest.raises(InvalidSignature):
        ed25519_verify(key.public_key(), v1a, content.replace(b"12", b"13"))
    with pytest.raises(InvalidSignature):
        ed25519_verify(SigningKey.generate().public_key(), v1a, content)


def test_v1a_alone_needs_no_shared_secret() -> None:
    key = SigningKey.generate()
    signature = sign([], MSG_ID, 1674087231, BODY, signing_key=key)
    assert signature.startswith("v1a,") and " " not in signature
    content = f"{MSG_ID}.1674087231.".encode() + BODY
    ed25519_verify(key.public_key(), entries(signature, "v1a")[0], content)


def test_a_signing_key_survives_export_and_its_keys_are_raw_ed25519() -> None:
    key = SigningKey.generate()
    exported = key.export_secret()
    assert exported.startswith("whsk_")
    seed = base64.b64decode(exported.removeprefix("whsk_"), validate=True)
    assert len(seed) == 32
    # The public half, derived from the exported seed by cryptography itself, is what we publish.
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    raw_public = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert key.public_key() == "whpk_" + base64.b64encode(raw_public).decode()

    reloaded = SigningKey.from_secret(exported)
    assert reloaded.public_key() == key.public_key()
    # Ed25519 is deterministic: the same key signs the same content the same way.
    assert sign([], MSG_ID, 1, BODY, signing_key=reloaded) == sign(
        [], MSG_ID, 1, BODY, signing_key=key
    )


def test_new_secret_is_32_random_bytes_behind_the_prefix() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert len({new_secret() for _ in range(20)}) == 20


@pytest.mark.parametrize("empty", ["", "whsec_"])
def test_an_empty_secret_is_refused(empty: str) -> None:
    good = new_secret()
    with pytest.raises(InvalidSecretError, match=r"secret #2 is empty") as caught:
        sign([good, empty], MSG_ID, now(), BODY)
    assert good.removeprefix("whsec_") not in str(caught.value)
    assert good.removeprefix("whsec_") not in repr(caught.value)


def test_a_malformed_secret_is_refused_without_quoting_it() -> None:
    malformed = "whsec_s3cr3t-passw0rd!"
    with pytest.raises(InvalidSecretError, match=r"secret #1 is not base64") as caught:
        sign([malformed], MSG_ID, now(), BODY)
    assert "s3cr3t" not in str(caught.value) and "s3cr3t" not in repr(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_signing_key_neither_shows_nor_leaks_its_secret() -> None:
    key = SigningKey.generate()
    seed = key.export_secret().removeprefix("whsk_")
    assert seed not in repr(key) and key.public_key() in repr(key)
    with pytest.raises(InvalidSecretError) as caught:
        SigningKey.from_secret(seed)  # no prefix: could be an HMAC secret, so refused
    assert seed not in str(caught.value)
    with pytest.raises(InvalidSecretError) as caught:
        SigningKey.from_secret("whsk_" + seed[:-8])  # too short for Ed25519
    assert seed[:-8] not in str(caught.value)


@pytest.mark.parametrize("msg_id", ["", "msg.1", "msg 1", "msg\r\n1"])
def test_an_id_that_could_shift_the_signed_content_is_refused(msg_id: str) -> None:
    with pytest.raises(ValueError, match="webhook id"):
        sign([new_secret()], msg_id, now(), BODY)


def test_nothing_to_sign_with_and_a_bare_str_are_refused() -> None:
    with pytest.raises(ValueError, match="no webhook secret"):
        sign([], MSG_ID, now(), BODY)
    with pytest.raises(TypeError, match="sequence"):
        sign(new_secret(), MSG_ID, now(), BODY)
