"""Secure aggregation: the server learns only the examples-weighted sum of the sites' updates.

Pairwise additive masking (Bonawitz et al. 2017) on fedseg's Message-API round loop: X25519 key
agreement through the server (`crypto`), updates as fixed-point integers modulo 2^64 (`ring`),
AES-CTR masks that cancel in the sum, Shamir-shared secrets so the round survives sites that drop
out (`site` for the sites' side, `server` for the round driver). Why this and not Flower's
SecAgg+ workflow: docs/secure-aggregation.md.
"""
