"""Gallery search: identification time per query against gallery sizes 10^3 .. 10^6, exact
(faiss ``IndexFlatIP``) and approximate (``IndexIVFFlat`` on inner product), and the recall@1 of
the approximate index against the exact one.

Synthetic embeddings: the gallery is N random unit vectors of dimension D (128 by default); each
query is an enrolled template plus Gaussian noise (cosine ~0.7 to it, a new photo of an enrolled
person), normalised. Times are medians over repeats after a warm-up, on ``--threads`` faiss
threads (1 by default: comparable on a shared machine):

- ``batch``: a batch of Q queries searched at once, time per query (throughput);
- ``single``: one query at a time (latency of `angular identify` on one image).

``python benchmarks/bench_gallery.py`` (``--quick``: up to 10^5) prints a markdown table and writes
it to ``benchmarks/results/gallery.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import harness
import numpy as np

from angular.serve.gallery import build_index, ivf_parameters


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def median_time(action, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    return statistics.median(harness.timed_runs(action, 1, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="gallery sizes up to 10^5")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gallery.md"))
    args = parser.parse_args()

    import faiss

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    sizes = [10**3, 10**4, 10**5] + ([] if args.quick else [10**6])
    rows = []
    for size in sizes:
        gallery = unit(rng.standard_normal((size, args.dim), dtype=np.float32))
        truth = rng.integers(0, size, args.queries)
        noise = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        queries = unit(gallery[truth] + noise * (1.0 / np.sqrt(args.dim)))
        result = {"size": size}
        for kind in ("exact", "approximate"):
            start = time.perf_counter()
            index = build_index(gallery, approximate=kind == "approximate")
            result[f"{kind}_build_s"] = time.perf_counter() - start
            repeats = 3 if size >= 10**5 else 10
            batch = median_time(lambda i=index, q=queries: i.search(q, 1), repeats)
            singles = queries[:20]
            single = median_time(
                lambda i=index, s=singles: [i.search(q[None], 1) for q in s], repeats
            )
            result[f"{kind}_batch_us"] = 1e6 * batch / len(queries)
            result[f"{kind}_single_us"] = 1e6 * single / len(singles)
            result[f"{kind}_top1"] = index.search(queries, 1)[1][:, 0]
        exact, approximate = result.pop("exact_top1"), result.pop("approximate_top1")
        result["recall@1"] = float(np.mean(approximate == exact))
        result["exact_correct"] = float(np.mean(exact == truth))
        result["ivf"] = "nlist {}, nprobe {}".format(*ivf_parameters(size))
        rows.append(result)
        print(result, flush=True)

    lines = [
        f"Gallery search, D = {args.dim}, {args.queries} queries, faiss {faiss.__version__} on "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}, {date.today()}",
        "",
        *harness.table_header(
            [
                "gallery",
                "exact batch µs/query",
                "exact single µs",
                "IVF batch µs/query",
                "IVF single µs",
                "IVF recall@1",
                "exact build s",
                "IVF build s",
                "IVF",
            ],
            align="---: ---: ---: ---: ---: ---: ---: ---: ---",
        ),  # fmt: skip
    ]
    for r in rows:
        lines.append(
            f"| {r['size']:,} | {r['exact_batch_us']:.1f} | {r['exact_single_us']:.1f} | "
            f"{r['approximate_batch_us']:.1f} | {r['approximate_single_us']:.1f} | "
            f"{r['recall@1']:.3f} | {r['exact_build_s']:.2f} | {r['approximate_build_s']:.2f} | "
            f"{r['ivf']} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
