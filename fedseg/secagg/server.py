"""The server's side of a secure round: four exchanges instead of one train stage.

1. setup   every sampled site gets an index 1..n, n and the threshold t = ⌊n/2⌋ + 1; it answers
           two X25519 public keys (U1: the sites that answered).
2. share   U1 gets every U1 key; each site answers Shamir shares (t of n) of its self-mask seed and
           of its mask key, encrypted for each other site (U2: the sites that answered).
3. train   each U2 site gets the strategy's train instruction, the U2 list and the shares addressed
           to it; it trains, checks its own update and answers its masked update (U3).
4. unmask  U3 gets (U3, U2 \\ U3); each answers the seed shares of U3 and the mask-key shares of the
           dropped sites. With t answers the server rebuilds the seeds of U3 (self masks) and the
           mask keys of the dropped sites (their pairwise masks with U3), removes them from the
           sum of U3's vectors and decodes Σ aᵢΔᵢ / Σ aᵢ.

A site lost in stage 1 or 2 is left out of the round; one lost in stage 3 (e.g. killed while
training) is recovered in stage 4. With fewer than t sites in U2, U3 or answering stage 4 the
round's update cannot be unmasked: the global model stays as it was and the history records why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log

from fedseg import messages as m
from fedseg.flower_compat import aggregate_metricrecords
from fedseg.record_values import as_float, list_of
from fedseg.secagg import crypto, ring
from fedseg.secagg.site import MASKED_KEY, round_context
from strategies.aggregate import array_view

MIN_SITES = 3  # with two sites each one learns the other's update from the new global model

Exchange = Callable[[list[Message]], list[tuple[int, Message]]]  # send, wait; (node, reply) of those that answered
Fail = Callable[[int, str, int | None], None]  # (node, reason, the error reply's code or None)


class SecureAggregationError(RuntimeError):
    """A secure round cannot start (too few live sites)."""


@dataclass
class SecureRoundResult:
    """The masked train replies (per-site metrics, or error replies) and the aggregate as one reply
    (None, with the reason, when the sum could not be unmasked)."""

    replies: list[tuple[int, Message]]
    aggregate: Message | None
    reason: str = ""


@dataclass
class SecureAggregation:
    """Runs the train stage of a round as a secure round over `exchange`."""

    bound: float
    max_update_ratio: float

    def train(
        self, server_round: int, instructions: list[Message], exchange: Exchange, fail: Fail
    ) -> SecureRoundResult:
        instructions = sorted(instructions, key=lambda msg: msg.metadata.dst_node_id)
        if len(instructions) < MIN_SITES:
            raise SecureAggregationError(
                f"secure aggregation needs at least {MIN_SITES} live sites in a round, only {len(instructions)} "
                f"in round {server_round} (with two, each site learns the other's update from the sum)"
            )
        first = instructions[0].content.config_records[m.CONFIG]
        context = ConfigRecord({m.RUN_KEY: first[m.RUN_KEY], m.SERVER_ROUND: server_round})
        round_ = _Round(self, server_round, context, instructions, exchange, fail)
        return round_.run()


@dataclass
class _Round:
    owner: SecureAggregation
    server_round: int
    context: ConfigRecord
    instructions: list[Message]
    exchange: Exchange
    fail: Fail

    def run(self) -> SecureRoundResult:
        self.node_of = {i + 1: msg.metadata.dst_node_id for i, msg in enumerate(self.instructions)}
        self.count = len(self.instructions)
        self.threshold = self.count // 2 + 1
        keys = self._setup()
        if len(keys) < self.threshold:
            return SecureRoundResult([], None, self._too_few("sent their keys", len(keys)))
        shares = self._share(keys)
        if len(shares) < self.threshold:
            return SecureRoundResult([], None, self._too_few("shared their secrets", len(shares)))
        replies, masked = self._train(shares)
        if len(masked) < self.threshold:
            return SecureRoundResult(replies, None, self._too_few("sent a masked update", len(masked)))
        config = self.instructions[0].content.config_records[m.CONFIG]
        uniform = as_float(config.get(m.DP_CLIP, 0.0)) > 0  # dp-distributed
        weights = {i: 1.0 if uniform else as_float(_metrics(reply)[m.NUM_EXAMPLES]) for i, (reply, _) in masked.items()}
        if not ring.fits(sum(weights.values()), self.owner.bound, len(masked)):
            return SecureRoundResult(
                replies,
                None,
                "the sites' total num-examples × secure-aggregation-bound "
                "would overflow the 64-bit ring; lower the bound",
            )
        dropped = sorted(set(shares) - set(masked))
        total = self._unmask(sorted(masked), dropped, {i: keys[i][1] for i in shares}, masked)
        if isinstance(total, str):
            return SecureRoundResult(replies, None, total)
        reference = self.instructions[0].content.array_records[m.ARRAYS]
        model = ring.decode(total, sum(weights.values()), reference)
        log(
            INFO,
            "[fedseg] secure aggregation: round %d summed %d site(s)%s",
            self.server_round,
            len(masked),
            f", {len(dropped)} dropped site(s) unmasked" if dropped else "",
        )
        return SecureRoundResult(replies, self._aggregate_reply(model, [reply for reply, _ in masked.values()]))

    # ------------------------------------------------------------------ stages
    def _setup(self) -> dict[int, tuple[bytes, bytes]]:
        def content(index: int) -> RecordDict:
            return self._record({m.SECAGG_INDEX: index, m.SECAGG_COUNT: self.count, m.SECAGG_THRESHOLD: self.threshold})

        answers = self._send(m.SECAGG_SETUP, {i: content(i) for i in self.node_of})
        keys = {}
        for index, config in answers.items():
            cipher, mask = config.get(m.SECAGG_CIPHER_KEY), config.get(m.SECAGG_MASK_KEY)
            if isinstance(cipher, bytes) and isinstance(mask, bytes) and len(cipher) == len(mask) == 32:
                keys[index] = (cipher, mask)
            else:
                self._malformed(index)
        return keys

    def _share(self, keys: dict[int, tuple[bytes, bytes]]) -> dict[int, dict[int, bytes]]:
        """Forwarded ciphertexts by receiver, then by sender (only senders that reached every other)."""
        participants = sorted(keys)
        record = self._record(
            {
                m.SECAGG_PARTICIPANTS: participants,
                m.SECAGG_CIPHER_KEYS: [keys[i][0] for i in participants],
                m.SECAGG_MASK_KEYS: [keys[i][1] for i in participants],
            }
        )
        answers = self._send(m.SECAGG_SHARE, {i: record for i in participants})
        inbox: dict[int, dict[int, bytes]] = {}
        for index, config in answers.items():
            destinations = list_of(config.get(m.SECAGG_DESTINATIONS), int)
            ciphertexts = list_of(config.get(m.SECAGG_SHARES), bytes)
            if (
                destinations is None
                or ciphertexts is None
                or sorted(destinations) != [i for i in participants if i != index]
                or len(ciphertexts) != len(destinations)
            ):
                self._malformed(index)
                continue
            inbox.setdefault(index, {})
            for destination, ciphertext in zip(destinations, ciphertexts, strict=True):
                inbox.setdefault(destination, {})[index] = ciphertext
        senders = set(answers) & set(inbox)
        return {i: {s: c for s, c in inbox[i].items() if s in senders} for i in sorted(senders)}

    def _train(self, shares: dict[int, dict[int, bytes]]) -> tuple[list[tuple[int, Message]], dict]:
        participants = sorted(shares)
        size = sum(int(np.prod(array.shape)) for array in self.instructions[0].content.array_records[m.ARRAYS].values())
        by_node = {msg.metadata.dst_node_id: msg for msg in self.instructions}
        contents = {}
        for index in participants:
            sources = sorted(s for s in shares[index] if s != index)
            secagg = self._record(
                {
                    m.SECAGG_PARTICIPANTS: participants,
                    m.SECAGG_SOURCES: sources,
                    m.SECAGG_SHARES: [shares[index][s] for s in sources],
                    m.SECAGG_BOUND: self.owner.bound,
                    m.SECAGG_MAX_UPDATE_RATIO: self.owner.max_update_ratio,
                }
            )
            instruction = by_node[self.node_of[index]].content
            contents[index] = RecordDict({**dict(instruction.items()), m.SECAGG: secagg[m.SECAGG]})
        log(
            INFO,
            "[fedseg] secure aggregation: round %d: %d site(s) train and mask their updates",
            self.server_round,
            len(participants),
        )
        pairs = self._exchange(m.SECAGG_TRAIN, contents)
        masked = {}
        index_of = {node: index for index, node in self.node_of.items()}
        for node, reply in pairs:
            if reply.has_error():
                continue  # the round loop records it with the other train failures
            vector = _masked_vector(reply, size)
            if vector is None:
                self._malformed(index_of[node])
            else:
                masked[index_of[node]] = (reply, vector)
        return pairs, masked

    def _unmask(
        self,
        survivors: list[int],
        dropped: list[int],
        mask_keys: dict[int, bytes],
        masked: dict[int, tuple[Message, np.ndarray]],
    ) -> np.ndarray | str:
        record = self._record({m.SECAGG_SURVIVORS: survivors, m.SECAGG_DROPPED: dropped})
        answers = self._send(m.SECAGG_UNMASK, {i: record for i in survivors})
        good = []  # (seed shares, key shares) of each well-formed answer
        for config in answers.values():
            seed_shares = list_of(config.get(m.SECAGG_SEED_SHARES, []), bytes)
            key_shares = list_of(config.get(m.SECAGG_KEY_SHARES, []), bytes)
            if (
                seed_shares is not None
                and key_shares is not None
                and len(seed_shares) == len(survivors)
                and len(key_shares) == len(dropped)
            ):
                good.append((seed_shares, key_shares))
        if len(good) < self.threshold:
            return self._too_few("answered the unmask request", len(good))
        good = good[: self.threshold]
        total = np.zeros(next(iter(masked.values()))[1].size, np.uint64)
        for _, vector in masked.values():
            np.add(total, vector, out=total)
        try:
            for k in range(len(survivors)):
                crypto.add_mask(total, crypto.combine_shares([seeds[k] for seeds, _ in good]), -1)
            for k, index in enumerate(dropped):
                secret = crypto.private_key(crypto.combine_shares([keys[k] for _, keys in good]))
                for survivor in survivors:
                    seed = crypto.agree(
                        secret,
                        mask_keys[survivor],
                        crypto.pair_label("mask", round_context(self.context), index, survivor),
                    )
                    crypto.add_mask(total, seed, -1 if survivor < index else +1)
        except ValueError:
            return "the sites' shares did not rebuild the round's secrets"
        return total

    # ------------------------------------------------------------------ helpers
    def _record(self, values: dict) -> RecordDict:
        return RecordDict({m.SECAGG: ConfigRecord({**dict(self.context.items()), **values})})

    def _send(self, action: str, contents: dict[int, RecordDict]) -> dict[int, ConfigRecord]:
        """Send one stage; the well-formed answers' SECAGG records by index (errors are recorded)."""
        index_of = {node: index for index, node in self.node_of.items()}
        answers = {}
        for node, reply in self._exchange(action, contents):
            if reply.has_error():
                self.fail(node, f"secure aggregation ({action}): {reply.error.reason}", int(reply.error.code))
            elif m.SECAGG in reply.content.config_records:
                answers[index_of[node]] = reply.content.config_records[m.SECAGG]
            else:
                self._malformed(index_of[node])
        return answers

    def _exchange(self, action: str, contents: dict[int, RecordDict]) -> list[tuple[int, Message]]:
        messages = [
            Message(
                content,
                dst_node_id=self.node_of[index],
                message_type=f"{MessageType.TRAIN}.{action}",
                group_id=str(self.server_round),
            )
            for index, content in contents.items()
        ]
        return self.exchange(messages)

    def _malformed(self, index: int) -> None:
        self.fail(self.node_of[index], "secure aggregation: malformed reply, left out of the round", None)

    def _too_few(self, what: str, found: int) -> str:
        reason = (
            f"secure aggregation: only {found} site(s) {what}, {self.threshold} needed to unmask the sum; "
            "the global model is unchanged this round"
        )
        log(WARNING, "[fedseg] round %d: %s", self.server_round, reason)
        return reason

    def _aggregate_reply(self, model: ArrayRecord, replies: Iterable[Message]) -> Message:
        """One reply holding the unmasked mean model and the sites' metrics averaged by num-examples."""
        records = []
        for reply in replies:
            values = {k: v for k, v in _metrics(reply).items() if k != m.SITE_ID}
            records.append(RecordDict({m.METRICS: MetricRecord(values)}))
        metrics = aggregate_metricrecords(records, m.NUM_EXAMPLES)
        metrics[m.NUM_EXAMPLES] = sum(as_float(_metrics(reply)[m.NUM_EXAMPLES]) for reply in replies)
        metrics[m.SECAGG_SUMMED] = len(records)
        content = RecordDict({m.ARRAYS: model, m.METRICS: metrics})
        return Message(content, dst_node_id=self.node_of[1], message_type=MessageType.TRAIN)


def _metrics(reply: Message) -> MetricRecord:
    return reply.content.metric_records[m.METRICS]


def _masked_vector(reply: Message, size: int) -> np.ndarray | None:
    """The reply's masked uint64 vector of the model's size, if it has one and a positive num-examples."""
    record = reply.content.array_records.get(m.SECAGG_MASKED)
    metrics = reply.content.metric_records.get(m.METRICS)
    if record is None or metrics is None or MASKED_KEY not in record:
        return None
    weight = metrics.get(m.NUM_EXAMPLES)
    if not isinstance(weight, (int, float)) or not 0 < weight < 2**53:
        return None
    try:
        vector = array_view(record[MASKED_KEY])  # zero-copy view of the received bytes
    except (ValueError, TypeError):
        return None
    return vector if vector.dtype == np.uint64 and vector.shape == (size,) else None
