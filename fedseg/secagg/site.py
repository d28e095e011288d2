"""The site's side of a secure round: keys, shares, the masked update, the unmasking shares.

The round's secrets (two X25519 private keys, the self-mask seed, the shares received) live in the
site's Flower `Context.state`, which the SuperNode keeps between the messages of a run (also when
each message runs in a fresh process); they are dropped once the site has answered the unmask
request, or when the next round starts. The site answers an unmask request only if it is
consistent: survivors and dropped sites disjoint, all of them participants, at least `threshold`
survivors, itself among them. So an honest-but-curious server never gets both secrets (the self
mask seed and the mask key) of one site from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from numpy.typing import ArrayLike

from fedseg import messages as m
from fedseg.noise import gaussian_source
from fedseg.record_values import as_bytes, as_float, as_int, as_str, bytes_list, int_list
from fedseg.secagg import crypto, ring

STATE = "secagg-state"  # Context.state record of the current secure round
MASKED_KEY = "masked"  # the one array in the SECAGG_MASKED record


@dataclass(frozen=True)
class DistributedNoise:
    """dp-distributed at this site: clip the update to norm `clip`, add N(0, noise_std²) per value."""

    clip: float
    noise_std: float
    source: str  # fedseg.noise: "numpy" or "secure"

    @classmethod
    def from_config(cls, config: ConfigRecord) -> DistributedNoise | None:
        """The instruction's dp-distributed settings, None when the strategy asks for none."""
        clip = as_float(config.get(m.DP_CLIP, 0.0))
        if clip <= 0:
            return None
        noise_std = as_float(config.get(m.DP_SITE_NOISE_STD, 0.0))
        return cls(clip, noise_std, as_str(config.get(m.DP_SITE_NOISE_SOURCE, "secure")))


class SecureRoundError(ValueError):
    """A secure-aggregation message does not fit the site's state of the round (a fixed public text)."""


class UpdateRefused(ValueError):
    """The site's own update failed the checks it runs before masking (a fixed public text)."""


def round_context(config: ConfigRecord) -> str:
    """Names the round in every key label and associated data: run key and server round."""
    return f"{as_str(config[m.RUN_KEY])}|{as_int(config[m.SERVER_ROUND])}"


def setup(config: ConfigRecord, context: Context) -> ConfigRecord:
    """Stage 1: fresh key pairs and self-mask seed for this round; reply the two public keys."""
    index, count = as_int(config[m.SECAGG_INDEX]), as_int(config[m.SECAGG_COUNT])
    threshold = as_int(config[m.SECAGG_THRESHOLD])
    if not (1 <= index <= count and 2 <= threshold <= count):
        raise SecureRoundError("inconsistent secure-aggregation setup (index, count, threshold)")
    cipher_key, mask_key = crypto.new_private_key(), crypto.new_private_key()
    context.state[STATE] = ConfigRecord(
        {
            "round": round_context(config),
            "index": index,
            "count": count,
            "threshold": threshold,
            "cipher-sk": crypto.private_bytes(cipher_key),
            "mask-sk": crypto.private_bytes(mask_key),
            "seed": crypto.new_seed(),
        }
    )
    return ConfigRecord(
        {m.SECAGG_CIPHER_KEY: crypto.public_bytes(cipher_key), m.SECAGG_MASK_KEY: crypto.public_bytes(mask_key)}
    )


def share(config: ConfigRecord, context: Context) -> ConfigRecord:
    """Stage 2: Shamir-share the seed and the mask key among the participants; each share encrypted
    for its receiver (the server only forwards them)."""
    state = _state(config, context, "cipher-sk")
    participants = int_list(config[m.SECAGG_PARTICIPANTS])
    cipher_keys, mask_keys = bytes_list(config[m.SECAGG_CIPHER_KEYS]), bytes_list(config[m.SECAGG_MASK_KEYS])
    index, threshold, count = as_int(state["index"]), as_int(state["threshold"]), as_int(state["count"])
    own_cipher = crypto.private_key(as_bytes(state["cipher-sk"]))
    round_name = as_str(state["round"])
    if (
        len(set(participants)) != len(participants)
        or index not in participants
        or len(cipher_keys) != len(participants)
        or len(mask_keys) != len(participants)
        or len(set(mask_keys)) != len(mask_keys)
        or len(participants) < threshold
        or cipher_keys[participants.index(index)] != crypto.public_bytes(own_cipher)
        or any(not 1 <= i <= count for i in participants)
    ):
        raise SecureRoundError("inconsistent secure-aggregation key list")
    seed_shares = crypto.create_shares(as_bytes(state["seed"]), threshold, count)
    key_shares = crypto.create_shares(as_bytes(state["mask-sk"]), threshold, count)
    destinations, ciphertexts = [], []
    for peer, peer_cipher in zip(participants, cipher_keys, strict=True):
        plaintext = seed_shares[peer - 1] + key_shares[peer - 1]
        if peer == index:
            state["own-share"] = plaintext
            continue
        key = crypto.agree(own_cipher, peer_cipher, crypto.pair_label("shares", round_name, index, peer))
        destinations.append(peer)
        ciphertexts.append(crypto.encrypt(key, plaintext, _associated(round_name, index, peer)))
    state["participants"], state["cipher-pks"], state["mask-pks"] = participants, cipher_keys, mask_keys
    return ConfigRecord({m.SECAGG_DESTINATIONS: destinations, m.SECAGG_SHARES: ciphertexts})


def mask(
    config: ConfigRecord,
    context: Context,
    reference: ArrayRecord,
    weights: Mapping[str, ArrayLike],
    weight: float,
    privacy: DistributedNoise | None = None,
) -> ArrayRecord:
    """Stage 3 (after the local fit): check the own update, encode a·Δ in the ring (under distributed
    DP: weight 1, Δ clipped and noised by `privacy`), add the pairwise masks of every other participant
    that shared its keys and the self mask."""
    state = _state(config, context, "participants")
    index, round_name = as_int(state["index"]), as_str(state["round"])
    participants = int_list(config[m.SECAGG_PARTICIPANTS])
    sources = int_list(config[m.SECAGG_SOURCES])
    known = int_list(state["participants"])
    received = bytes_list(config[m.SECAGG_SHARES])
    if (
        index not in participants
        or sorted(set(sources) | {index}) != sorted(participants)
        or len(sources) != len(set(sources))
        or not set(participants) <= set(known)
        or len(participants) < as_int(state["threshold"])
        or len(received) != len(sources)
    ):
        raise SecureRoundError("inconsistent secure-aggregation participant list")
    state["sources"], state["received"] = sources, received
    if privacy is None:
        vector, stats = ring.encode_update(reference, weights, weight)
    else:
        norm = ring.update_norm(reference, weights)
        scale = min(1.0, privacy.clip / norm) if norm > 0 else 1.0
        source = gaussian_source(privacy.source)
        vector, stats = ring.encode_update(
            reference, weights, 1.0, scale, lambda size: source.normal(0.0, privacy.noise_std, size)
        )
    check_update(stats, reference, as_float(config[m.SECAGG_MAX_UPDATE_RATIO]), as_float(config[m.SECAGG_BOUND]))
    own_mask = crypto.private_key(as_bytes(state["mask-sk"]))
    mask_keys = dict(zip(known, bytes_list(state["mask-pks"]), strict=True))
    for peer in participants:
        if peer != index:
            seed = crypto.agree(own_mask, mask_keys[peer], crypto.pair_label("mask", round_name, index, peer))
            crypto.add_mask(vector, seed, +1 if index < peer else -1)
    crypto.add_mask(vector, as_bytes(state["seed"]), +1)
    return ArrayRecord({MASKED_KEY: Array(vector)})


def unmask(config: ConfigRecord, context: Context) -> ConfigRecord:
    """Stage 4: the seed shares of the survivors and the mask-key shares of the dropped sites; then
    the round's secrets are forgotten."""
    state = _state(config, context, "received")
    index, round_name = as_int(state["index"]), as_str(state["round"])
    survivors = int_list(config[m.SECAGG_SURVIVORS])
    dropped = int_list(config[m.SECAGG_DROPPED])
    sources = int_list(state["sources"])
    participants = set(sources) | {index}
    if (
        set(survivors) & set(dropped)
        or len(set(survivors)) != len(survivors)
        or len(set(dropped)) != len(dropped)
        or index not in survivors
        or not set(survivors) | set(dropped) <= participants
        or len(survivors) < as_int(state["threshold"])
    ):
        raise SecureRoundError("inconsistent secure-aggregation unmask request")
    cipher_keys = dict(zip(int_list(state["participants"]), bytes_list(state["cipher-pks"]), strict=True))
    own_cipher = crypto.private_key(as_bytes(state["cipher-sk"]))
    own_share = as_bytes(state["own-share"])
    shares = {index: own_share}
    for source, ciphertext in zip(sources, bytes_list(state["received"]), strict=True):
        key = crypto.agree(own_cipher, cipher_keys[source], crypto.pair_label("shares", round_name, source, index))
        shares[source] = crypto.decrypt(key, ciphertext, _associated(round_name, source, index))
    half = len(own_share) // 2
    del context.state[STATE]
    return ConfigRecord(
        {
            m.SECAGG_SEED_SHARES: [shares[i][:half] for i in survivors],
            m.SECAGG_KEY_SHARES: [shares[i][half:] for i in dropped],
        }
    )


def check_update(stats: ring.UpdateStats, reference: ArrayRecord, max_update_ratio: float, bound: float) -> None:
    """The checks the server can no longer run on one reply, run by the site on its own update:
    finite values, update norm ≤ max-update-ratio × max(global norm, 1) (as the strategies check;
    0: off), every value within the ring's bounds (no overflow)."""
    if not stats.finite:
        raise UpdateRefused("the update holds non-finite values")
    if max_update_ratio > 0:
        reference_norm = np.sqrt(
            sum(float(np.dot(v.ravel(), v.ravel())) for _, v in ring.layout(reference) if v.dtype.kind == "f")
        )
        if stats.float_norm > max_update_ratio * max(reference_norm, 1.0):
            raise UpdateRefused("the update norm exceeds max-update-ratio × the global model's norm")
    if stats.float_max > bound:
        raise UpdateRefused("an update value exceeds run-config 'secure-aggregation-bound'")
    if stats.integer_max > ring.INTEGER_BOUND:
        raise UpdateRefused("an integer buffer changed by more than the ring allows")


def _state(config: ConfigRecord, context: Context, needs: str) -> ConfigRecord:
    """The stored state of the round `config` names, which must have reached the stage holding `needs`."""
    state = context.state.config_records.get(STATE)
    if state is None or state["round"] != round_context(config) or needs not in state:
        raise SecureRoundError("secure-aggregation message out of order for this round")
    return state


def _associated(round_name: str, source: int, destination: int) -> bytes:
    return f"fedseg-secagg-share|{round_name}|{source}->{destination}".encode()
