"""The cryptographic parts of secure aggregation, all from `cryptography` and Flower's Shamir helper.

- Key agreement: X25519 (`cryptography`), the shared secret stretched by HKDF-SHA256 with a label
  that binds it to the run, the round, the pair of sites and its use (mask seed or share cipher).
- Pseudo-random masks: AES-256 in counter mode keyed by a 32-byte seed (the PRG of Bonawitz et al.
  2017), read as uint64 words and added to (or subtracted from) a vector modulo 2^64 in place,
  chunk by chunk, so a 20 M-parameter mask never exists as a whole.
- Share transport: AES-256-GCM between two sites (the server forwards the ciphertexts); the
  associated data names run, round, sender and receiver, so a share cannot be replayed elsewhere.
- Secret sharing: Flower's `create_shares` / `combine_shares` (pycryptodome's Shamir over GF(2^128)).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedseg.flower_compat import combine_shares, create_shares

SEED_BYTES = 32
NONCE_BYTES = 12
_CHUNK_WORDS = 1 << 17  # uint64 words of keystream per AES call (1 MiB)
_ZEROS = bytes(_CHUNK_WORDS * 8)

__all__ = ["combine_shares", "create_shares"]


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_key(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def agree(own: X25519PrivateKey, peer_public: bytes, label: bytes) -> bytes:
    """A 32-byte key both sides derive alike: X25519(own, peer) through HKDF-SHA256 with `label`."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=label).derive(shared)


def pair_label(use: str, context: str, first: int, second: int) -> bytes:
    """The HKDF label of a key between participants `first` and `second` (order-free)."""
    low, high = sorted((first, second))
    return f"fedseg-secagg|{use}|{context}|{low}|{high}".encode()


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """The plaintext; `cryptography`'s InvalidTag if the ciphertext or its associated data were changed."""
    return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated)


def add_mask(vector: np.ndarray, seed: bytes, sign: int) -> None:
    """vector ← vector ± PRG(seed) modulo 2^64, in place (`vector` is uint64, C-contiguous)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = np.empty(_CHUNK_WORDS + 2, np.uint64)  # update_into wants one block of slack
    raw = stream.data.cast("B")
    combine = np.add if sign > 0 else np.subtract
    for start in range(0, vector.size, _CHUNK_WORDS):
        part = vector[start : start + _CHUNK_WORDS]
        encryptor.update_into(_ZEROS[: part.size * 8], raw)
        combine(part, stream[: part.size], out=part)
