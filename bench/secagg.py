"""Benchmark 6: the cost of a secure-aggregation round vs a plain FedAvg round, without training.

Both sides start from the same sites' float32 models (a random global model plus a small update)
and end with the new global model. Plain: fedseg's FedAvg aggregates the n reply Messages (the
server's whole job in a plain round). Secure: `fedseg.secagg`'s four exchanges over fedseg's
in-process LocalGrid with a ClientApp whose sites hold those models: key setup, Shamir shares,
fixed-point encoding + masks, unmasking. Times are split into the sites' work (summed over sites,
and per site: each site runs in parallel in a real federation) and the server's. No transport: the
bytes each site uploads are reported instead (float32 weights vs uint64 masked words).
"""

from __future__ import annotations

import gc
import time

import numpy as np

from bench.aggregation import layer_sizes
from bench.common import BenchOptions, median, print_table, write_result


def cases(options: BenchOptions) -> list[dict]:
    repeats = 1 if options.quick else 3
    return [
        {"params": params, "sites": sites, "repeats": repeats}
        for params in (1_200_000, 20_000_000)
        for sites in (3, 10)
    ]


def run_case(params: int, sites: int, repeats: int) -> dict:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.supercore.task_identity import TaskIdentity

    from fedseg import messages as m
    from fedseg.experiments.local_grid import LocalGrid
    from fedseg.secagg import site as secagg_site
    from fedseg.secagg.server import SecureAggregation
    from strategies.fedavg import FedAvg

    for name in ("_run_id", "_node_id", "_task_id"):  # the ServerApp runtime sets these normally
        setattr(TaskIdentity, name, 1)
    rng = np.random.default_rng(0)
    base = {f"layer{i}": rng.standard_normal(size, dtype=np.float32) for i, size in enumerate(layer_sizes(params))}
    arrays = ArrayRecord({k: Array(v) for k, v in base.items()})
    nodes = list(range(100, 100 + sites))
    models = {
        n: {k: v + np.float32(0.01) * rng.standard_normal(v.size, dtype=np.float32) for k, v in base.items()}
        for n in nodes
    }
    site_seconds = {n: 0.0 for n in nodes}

    def timed(stage):
        def handler(msg: Message, context: Context) -> Message:
            started = time.perf_counter()
            if stage is None:
                content = msg.content
                masked = secagg_site.mask(content[m.SECAGG], context, content[m.ARRAYS], models[context.node_id], 20.0)
                reply = RecordDict({m.SECAGG_MASKED: masked, m.METRICS: MetricRecord({m.NUM_EXAMPLES: 20})})
            else:
                reply = RecordDict({m.SECAGG: stage(msg.content[m.SECAGG], context)})
            site_seconds[context.node_id] += time.perf_counter() - started
            return Message(reply, reply_to=msg)

        return handler

    app = ClientApp()
    app.train(m.SECAGG_SETUP)(timed(secagg_site.setup))
    app.train(m.SECAGG_SHARE)(timed(secagg_site.share))
    app.train(m.SECAGG_UNMASK)(timed(secagg_site.unmask))
    app.train(m.SECAGG_TRAIN)(timed(None))
    config = ConfigRecord({m.RUN_KEY: "bench", m.SERVER_ROUND: 1})

    def secure() -> tuple[float, float, float]:
        grid = LocalGrid({}, [{} for _ in nodes], client_app=app)
        for n in nodes:
            site_seconds[n] = 0.0
        instructions = [
            Message(RecordDict({m.ARRAYS: arrays, m.CONFIG: config}), dst_node_id=n, message_type="train")
            for n in grid.get_node_ids()
        ]

        def exchange(messages: list[Message]) -> list[tuple[int, Message]]:
            replies = {r.metadata.reply_to_message_id: r for r in grid.send_and_receive(messages)}
            return [(msg.metadata.dst_node_id, replies[msg.metadata.message_id]) for msg in messages]

        started = time.perf_counter()
        result = SecureAggregation(16.0, 100.0).train(1, instructions, exchange, lambda *a: None)
        total = time.perf_counter() - started
        assert result.aggregate is not None, result.reason
        sites_total = sum(site_seconds.values())
        return total - sites_total, sites_total, max(site_seconds.values())

    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in models[n].items()}),
                    "metrics": MetricRecord({m.NUM_EXAMPLES: 20}),
                }
            ),
            dst_node_id=n,
            message_type="train",
        )
        for n in nodes
    ]

    def plain() -> float:
        strategy = FedAvg(min_sites=sites)
        strategy._global = arrays
        started = time.perf_counter()
        new, _ = strategy.aggregate_train(1, replies)
        assert new is not None
        return time.perf_counter() - started

    plain_s, server_s, sites_s, site_max_s = [], [], [], []
    for _ in range(repeats):
        plain_s.append(plain())
        gc.collect()
        server, all_sites, one_site = secure()
        server_s.append(server)
        sites_s.append(all_sites)
        site_max_s.append(one_site)
        gc.collect()
    return {
        "params": params,
        "sites": sites,
        "plain_server_s": median(plain_s),
        "secure_server_s": median(server_s),
        "secure_sites_total_s": median(sites_s),
        "secure_slowest_site_s": median(site_max_s),
        "upload_mb_plain": params * 4 / 1e6,
        "upload_mb_secure": params * 8 / 1e6,
    }


def run(options: BenchOptions) -> None:
    results = [run_case(**case) for case in cases(options)]
    rows = [
        [
            f"{r['params'] / 1e6:g} M × {r['sites']}",
            f"{r['plain_server_s']:.3f}",
            f"{r['secure_server_s']:.2f}",
            f"{r['secure_slowest_site_s']:.2f}",
            f"{r['secure_sites_total_s']:.2f}",
            f"{(r['secure_server_s'] + r['secure_slowest_site_s']) / r['plain_server_s']:.0f}",
            f"{r['upload_mb_plain']:.1f} / {r['upload_mb_secure']:.1f}",
        ]
        for r in results
    ]
    print_table(
        "Secure aggregation round vs plain FedAvg (no training)",
        [
            "params × sites",
            "plain server s",
            "secure server s",
            "secure per site s",
            "secure all sites s",
            "(server + site) / plain",
            "upload MB per site plain / secure",
        ],
        rows,
    )
    write_result("secagg", options, {"cases": results})
