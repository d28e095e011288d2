"""Benchmark 3: aggregation time of fedseg's strategies vs Flower's FedAvg vs a bare float32 weighted mean.

All sides aggregate the same reply Messages (float32 weights as ArrayRecords, `num-examples` and
`val-dice` metrics), built without a Flower runtime. Each (parameters × sites) case runs in its own
process, so its memory is measured alone: timings alternate between the sides (ABC...) and the
extra peak memory of each side (above the replies already held) comes from tracemalloc in a
separate, untimed call. Targets: fedseg ≤ 0.5 × Flower's time and ≤ 2 × the bare mean.
"""

from __future__ import annotations

import gc
import multiprocessing
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from bench.common import BenchOptions, interleaved, median, paired_ratios, print_table, write_result

TARGET_VS_FLOWER = 0.5
TARGET_VS_BARE = 2.0
FEDSEG_STRATEGIES = ("fedavg", "dice-weighted")
REPLY_BYTES_LIMIT = 4 * 2**30  # distinct reply bytes held at once; the 2-core test machine has 24 GB


def cases(options: BenchOptions) -> list[dict]:
    """Parameter counts × sites. Where all replies would not fit in `REPLY_BYTES_LIMIT`, the replies
    beyond the first `distinct` ones reuse those ones' bytes (each aggregation still reads every
    reply from memory: the distinct replies alone are far larger than any CPU cache)."""
    grid = [(5_000_000, 10), (5_000_000, 100), (50_000_000, 10), (50_000_000, 100)]
    out = []
    for params, sites in grid:
        distinct = min(sites, REPLY_BYTES_LIMIT // (params * 4))
        repeats = (5 if params * sites <= 5e7 else 3) if options.quick else (9 if params * sites <= 5e7 else 5)
        out.append(
            {
                "params": params,
                "sites": sites,
                "distinct": distinct,
                "reply_gb": params * 4 * distinct / 2**30,
                "repeats": repeats,
            }
        )
    return out


def layer_sizes(params: int) -> list[int]:
    """A model's tensors: conv-like weights of ~1/20 of the model each, with small bias vectors."""
    weight = params // 20
    sizes = []
    while sum(sizes) + weight + 64 <= params:
        sizes += [weight, 64]
    sizes.append(params - sum(sizes))
    return sizes


def build_replies(params: int, sites: int, distinct: int, seed: int = 0):
    """(global ArrayRecord, reply Messages) for one case; site i sends the weights of site i mod `distinct`."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # the ServerApp runtime sets these normally
        setattr(TaskIdentity, name, 1)
    rng = np.random.default_rng(seed)
    base = {f"layer{i}": rng.standard_normal(size, dtype=np.float32) for i, size in enumerate(layer_sizes(params))}
    base["bn.num_batches_tracked"] = np.array(10, dtype=np.int64)
    global_arrays = ArrayRecord({k: Array(v) for k, v in base.items()})
    instruction = Message(
        RecordDict({"arrays": global_arrays, "config": ConfigRecord({})}), dst_node_id=1, message_type="train"
    )
    weights: list[dict[str, Array]] = []
    for site in range(distinct):
        state = {k: (v + np.float32(0.001 * (site + 1)) if v.dtype == np.float32 else v) for k, v in base.items()}
        weights.append({k: Array(v) for k, v in state.items()})
        del state
    replies = []
    for site in range(sites):
        metrics = MetricRecord({"num-examples": 10 + site, "val-dice": 0.5 + 0.4 * site / sites, "site-id": site})
        content = RecordDict({"arrays": ArrayRecord(dict(weights[site % distinct])), "metrics": metrics})
        replies.append(Message(content=content, reply_to=instruction))
    return global_arrays, replies


def bare_mean(replies, weights: list[float]) -> dict[str, np.ndarray]:
    """Σ wᵢ·xᵢ / Σ wᵢ in float32 over already-decoded arrays (zero-copy views of the replies)."""
    from strategies.aggregate import array_view

    total = sum(weights)
    records = [next(iter(r.content.array_records.values())) for r in replies]
    out = {}
    for key in records[0]:
        views = [array_view(record[key]) for record in records]
        acc = views[0] * np.float32(weights[0] / total)
        scratch = np.empty_like(acc)
        for view, weight in zip(views[1:], weights[1:], strict=True):
            acc += np.multiply(view, np.float32(weight / total), out=scratch, casting="unsafe")
        out[key] = acc
    return out


def sides_for(global_arrays, replies) -> dict[str, Callable[[], object]]:
    """name → zero-argument aggregation call on the same replies."""
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    from fedseg.config import RunConfig
    from strategies.registry import build_strategy

    class Nodes:  # just enough of a Grid for configure_train
        def get_node_ids(self) -> list[int]:
            return list(range(1, len(replies) + 1))

    sides: dict[str, Callable[[], object]] = {}
    for name in FEDSEG_STRATEGIES:
        strategy = build_strategy(RunConfig(strategy=name, min_sites=1))
        strategy.configure_train(1, global_arrays, ConfigRecord({}), Nodes())
        sides[f"fedseg {name}"] = lambda s=strategy: s.aggregate_train(1, replies)
    flower = FlowerFedAvg(min_train_nodes=1, min_available_nodes=1)
    sides["flower FedAvg"] = lambda: flower.aggregate_train(1, replies)
    weights = [float(next(iter(r.content.metric_records.values()))["num-examples"]) for r in replies]
    sides["bare f32 mean"] = lambda: bare_mean(replies, weights)
    return sides


def measure_case(case: dict) -> dict:
    """Runs in a fresh process: build replies, time all sides alternately, then trace each side's peak."""
    import logging

    global_arrays, replies = build_replies(case["params"], case["sites"], case["distinct"])
    logging.getLogger("flwr").setLevel(logging.WARNING)  # after flwr's import, which sets it
    sides = sides_for(global_arrays, replies)
    interleaved(sides, repeats=1)  # warm-up
    times = interleaved(sides, case["repeats"])
    peaks = {}
    for name, run in sides.items():
        gc.collect()
        tracemalloc.start()
        run()
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    result = {**case, "seconds": {k: median(v) for k, v in times.items()}, "all_seconds": times, "peak_mb": {}}
    result["peak_mb"] = {k: v / 2**20 for k, v in peaks.items()}
    for name in FEDSEG_STRATEGIES:
        side = f"fedseg {name}"
        result[f"{name}_vs_flower"] = median(paired_ratios(times[side], times["flower FedAvg"]))
        result[f"{name}_vs_bare"] = median(paired_ratios(times[side], times["bare f32 mean"]))
    return result


def run(options: BenchOptions) -> dict:
    results = []
    context = multiprocessing.get_context("spawn")
    for case in cases(options):
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            results.append(pool.submit(measure_case, case).result())
    side_names = list(results[0]["seconds"])
    print_table(
        f"3. aggregation seconds (median) and extra peak MB "
        f"(targets: fedseg <= {TARGET_VS_FLOWER} x Flower, <= {TARGET_VS_BARE} x bare)",
        [
            "params x sites",
            *side_names,
            *[f"{n} vs flower" for n in FEDSEG_STRATEGIES],
            *[f"{n} vs bare" for n in FEDSEG_STRATEGIES],
            *[f"MB {n}" for n in side_names],
        ],
        [
            [
                f"{r['params'] / 1e6:g}M x {r['sites']}",
                *[r["seconds"][n] for n in side_names],
                *[r[f"{n}_vs_flower"] for n in FEDSEG_STRATEGIES],
                *[r[f"{n}_vs_bare"] for n in FEDSEG_STRATEGIES],
                *[r["peak_mb"][n] for n in side_names],
            ]
            for r in results
        ],
    )
    for r in results:
        if r["distinct"] < r["sites"]:
            print(
                f"{r['params'] / 1e6:g}M x {r['sites']}: {r['distinct']} distinct replies ({r['reply_gb']:.1f} GB), "
                "the others reuse their bytes"
            )
    payload = {"target_vs_flower": TARGET_VS_FLOWER, "target_vs_bare": TARGET_VS_BARE, "cases": results}
    write_result("aggregation", options, payload)
    return payload
