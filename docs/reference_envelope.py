#!/usr/bin/env python3
"""Independent reference implementation of the ringfence envelopes (docs/crypto.md).

Written from the document alone, with Python's `cryptography` package, to show that the
specification is complete: it derives record keys and seals and opens field envelopes
in format 1 (root key only) and format 2 (root key and the data subject's secret; key
id and subject in the header).

    python3 docs/reference_envelope.py      prints tests/data/envelope_kat.json (format 1)
    python3 docs/reference_envelope.py v2   prints tests/data/envelope_v2_kat.json (format 2)

byte for byte: the known-answer vectors of the Rust implementation.
"""
import hashlib
import hmac
import json
import struct
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT_KEY_SALT = b"ringfence/v1 root-key"
RECORD_KEY_LABEL = b"ringfence/v1 record-key"
KEY_ID_LABEL = b"ringfence/v2 key-id"
SUBJECT_RECORD_SALT = b"ringfence/v2 subject-record-key"
RECORD_KEY_LABEL_V2 = b"ringfence/v2 record-key"


def lp16(value: bytes) -> bytes:
    return struct.pack(">H", len(value)) + value


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def record_key(root: bytes, jurisdiction: str, key_version: int, record_type: str, record_id: str) -> bytes:
    prk = hkdf_extract(ROOT_KEY_SALT, root)
    info = (
        lp16(RECORD_KEY_LABEL)
        + lp16(jurisdiction.encode())
        + struct.pack(">I", key_version)
        + lp16(record_type.encode())
        + lp16(record_id.encode())
    )
    return hkdf_expand(prk, info, 32)


def header(jurisdiction: str, key_version: int, nonce: bytes) -> bytes:
    code = jurisdiction.encode()
    return b"RF" + bytes([1, len(code)]) + code + struct.pack(">I", key_version) + nonce


def aad(hdr: bytes, record_type: str, record_id: str, field: str) -> bytes:
    return hdr + lp16(record_type.encode()) + lp16(record_id.encode()) + lp16(field.encode())


def seal(root, jurisdiction, key_version, record_type, record_id, field, nonce, plaintext):
    key = record_key(root, jurisdiction, key_version, record_type, record_id)
    hdr = header(jurisdiction, key_version, nonce)
    return hdr + AESGCM(key).encrypt(nonce, plaintext, aad(hdr, record_type, record_id, field))


def open_envelope(root, record_type, record_id, field, envelope: bytes) -> bytes:
    assert envelope[:3] == b"RF\x01", "not a v1 envelope"
    code_len = envelope[3]
    jurisdiction = envelope[4 : 4 + code_len].decode()
    (key_version,) = struct.unpack(">I", envelope[4 + code_len : 8 + code_len])
    nonce = envelope[8 + code_len : 20 + code_len]
    hdr = envelope[: 20 + code_len]
    key = record_key(root, jurisdiction, key_version, record_type, record_id)
    return AESGCM(key).decrypt(nonce, envelope[20 + code_len :], aad(hdr, record_type, record_id, field))


# Format 2 -----------------------------------------------------------------------------


def u32be(value: int) -> bytes:
    return struct.pack(">I", value)


def key_id(root: bytes, jurisdiction: str, key_version: int) -> bytes:
    prk = hkdf_extract(ROOT_KEY_SALT, root)
    return hkdf_expand(prk, lp16(KEY_ID_LABEL) + lp16(jurisdiction.encode()) + u32be(key_version), 16)


def subject_record_key(root, subject_secret, jurisdiction, key_version, subject_id, record_type, record_id) -> bytes:
    prk_root = hkdf_extract(ROOT_KEY_SALT, root)
    prk_subject = hkdf_extract(SUBJECT_RECORD_SALT, prk_root + subject_secret)
    info = (
        lp16(RECORD_KEY_LABEL_V2)
        + lp16(jurisdiction.encode())
        + u32be(key_version)
        + lp16(subject_id.encode())
        + lp16(record_type.encode())
        + lp16(record_id.encode())
    )
    return hkdf_expand(prk_subject, info, 32)


def header_v2(jurisdiction: str, key_version: int, kid: bytes, subject_id: str, nonce: bytes) -> bytes:
    code = jurisdiction.encode()
    return (
        b"RF" + bytes([2, len(code)]) + code + u32be(key_version) + kid + lp16(subject_id.encode()) + nonce
    )


def seal_v2(root, subject_secret, jurisdiction, key_version, subject_id, record_type, record_id, field, nonce, plaintext):
    key = subject_record_key(root, subject_secret, jurisdiction, key_version, subject_id, record_type, record_id)
    hdr = header_v2(jurisdiction, key_version, key_id(root, jurisdiction, key_version), subject_id, nonce)
    return hdr + AESGCM(key).encrypt(nonce, plaintext, aad(hdr, record_type, record_id, field))


def open_envelope_v2(root, subject_secret, record_type, record_id, field, envelope: bytes) -> bytes:
    assert envelope[:3] == b"RF\x02", "not a v2 envelope"
    code_len = envelope[3]
    at = 4
    jurisdiction = envelope[at : at + code_len].decode()
    at += code_len
    (key_version,) = struct.unpack(">I", envelope[at : at + 4])
    at += 4
    kid = envelope[at : at + 16]
    at += 16
    (subject_len,) = struct.unpack(">H", envelope[at : at + 2])
    at += 2
    subject_id = envelope[at : at + subject_len].decode()
    at += subject_len
    nonce = envelope[at : at + 12]
    at += 12
    hdr = envelope[:at]
    # The key id names the root key: another key under the same version number is
    # refused before anything is decrypted (unknown key version).
    if kid != key_id(root, jurisdiction, key_version):
        raise ValueError("unknown key version: the envelope names another root key")
    key = subject_record_key(root, subject_secret, jurisdiction, key_version, subject_id, record_type, record_id)
    return AESGCM(key).decrypt(nonce, envelope[at:], aad(hdr, record_type, record_id, field))


def vector_v1() -> dict:
    vector = {
        "root_key": bytes(range(32)).hex(),
        "jurisdiction": "US",
        "key_version": 1,
        "record_type": "user_profile",
        "record_id": "u-42",
        "field": "email",
        "nonce": bytes(range(12)).hex(),
        "plaintext": b"alice@example.com".hex(),
    }
    root = bytes.fromhex(vector["root_key"])
    vector["record_key"] = record_key(root, "US", 1, "user_profile", "u-42").hex()
    envelope = seal(root, "US", 1, "user_profile", "u-42", "email", bytes(range(12)), b"alice@example.com")
    assert open_envelope(root, "user_profile", "u-42", "email", envelope) == b"alice@example.com"
    vector["envelope"] = envelope.hex()
    return vector


def vector_v2() -> dict:
    root = bytes(range(32))
    secret = bytes(range(32, 64))
    jurisdiction, version = "US", 1
    subject_id, record_type, record_id, field = "person-7", "user_profile", "u-42", "email"
    nonce = bytes(range(12))
    plaintext = b"alice@example.com"
    envelope = seal_v2(root, secret, jurisdiction, version, subject_id, record_type, record_id, field, nonce, plaintext)
    assert open_envelope_v2(root, secret, record_type, record_id, field, envelope) == plaintext
    # Without the subject's secret (shredded), no key opens the envelope.
    try:
        open_envelope_v2(root, bytes(32), record_type, record_id, field, envelope)
    except InvalidTag:
        pass
    else:
        raise AssertionError("a different subject secret opened the envelope")
    return {
        "root_key": root.hex(),
        "subject_secret": secret.hex(),
        "jurisdiction": jurisdiction,
        "key_version": version,
        "key_id": key_id(root, jurisdiction, version).hex(),
        "subject_id": subject_id,
        "record_type": record_type,
        "record_id": record_id,
        "field": field,
        "nonce": nonce.hex(),
        "plaintext": plaintext.hex(),
        "record_key": subject_record_key(root, secret, jurisdiction, version, subject_id, record_type, record_id).hex(),
        "envelope": envelope.hex(),
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["v2"]:
        print(json.dumps(vector_v2(), indent=2))
    elif sys.argv[1:] == []:
        print(json.dumps(vector_v1(), indent=2))
    else:
        sys.exit("usage: reference_envelope.py [v2]")
