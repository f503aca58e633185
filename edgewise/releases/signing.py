"""Ed25519 keys, key ids and the signatures inside an :class:`~edgewise.releases.wire.Envelope`.

``cryptography`` is the only library that touches key material; its exceptions are translated
here (:class:`~edgewise.releases.errors.BadKey`, or ``False`` from :func:`signature_valid`).
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgewise.releases.errors import BadKey
from edgewise.releases.wire import (
    Command,
    Envelope,
    KeySet,
    Kind,
    Manifest,
    PublicKey,
    Signature,
    encode,
    kind_of,
)

_DOMAIN: Final = b"edgewise/%s/v1\x00"


def signed_bytes(kind: Kind, payload: bytes) -> bytes:
    """What a signature covers: the kind (domain separation) and the payload's exact bytes."""
    return _DOMAIN % kind.encode() + payload


def key_id(public: bytes) -> str:
    """A key's id: the first 16 bytes of SHA-256 of its raw 32-byte public key, hex."""
    return hashlib.sha256(public).hexdigest()[:32]


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def raw_public(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_entry(key: Ed25519PrivateKey | Ed25519PublicKey) -> PublicKey:
    raw = raw_public(key)
    return PublicKey(id=key_id(raw), key=raw)


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private(pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BadKey(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadKey(f"a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public(data: bytes) -> Ed25519PublicKey:
    """A public key from PEM, or from its raw 32 bytes (or their 64-character hex)."""
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
            if not isinstance(key, Ed25519PublicKey):
                raise BadKey(f"a {type(key).__name__}, not an Ed25519 public key")
            return key
        raw = bytes.fromhex(text.decode("ascii")) if len(text) == 64 else bytes(text)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise BadKey(f"not an Ed25519 public key (PEM, raw or hex): {exc}") from None


def sign(doc: KeySet | Manifest | Command, *keys: Ed25519PrivateKey) -> bytes:
    """The envelope bytes of ``doc`` signed by each of ``keys``."""
    if not keys:
        raise ValueError("sign needs at least one key")
    kind = kind_of(doc)
    payload = encode(doc)
    message = signed_bytes(kind, payload)
    sigs = [Signature(k=key_id(raw_public(k)), s=k.sign(message)) for k in keys]
    return encode(Envelope(kind=kind, payload=payload, sigs=sigs))


def signature_valid(public: bytes, signature: bytes, kind: Kind, payload: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, signed_bytes(kind, payload))
    except (InvalidSignature, ValueError):
        return False
    return True


def envelope_id(data: bytes) -> str:
    """A document's identity: SHA-256 of the exact envelope bytes, hex (first 32 characters)."""
    return hashlib.sha256(data).hexdigest()[:32]


__all__ = [
    "Envelope",
    "envelope_id",
    "generate",
    "key_id",
    "load_private",
    "load_public",
    "private_pem",
    "public_entry",
    "public_pem",
    "raw_public",
    "sign",
    "signature_valid",
    "signed_bytes",
]
