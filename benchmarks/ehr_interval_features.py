"""Benchmark: interval features for every item of a cohort, vectorised kernel vs a pandas groupby/apply.

A synthetic MEDS-style table (default 10 M events over 100 k subjects, 3-7 visits each, 20 lab
codes with 5 % missing values and duplicate timestamps, 2 drugs as daily-dose start/stop pairs)
is built in the order :func:`monai_twin.data.load_manifest` returns events (sorted by subject,
time). Then:

* ``fast``: :func:`monai_twin.transforms.ehr.interval_feature_table` on all subjects -- every
  (subject, visit interval) row, so every dataset item with full history is a slice of the result;
* ``reference``: a straightforward per-subject ``groupby(...).apply`` in pandas producing the same
  (J, F) table, written below; run on a random subset of subjects (it takes ~10 ms per subject)
  and checked equal to the fast table on those rows. Its full-size time is extrapolated linearly
  in the number of subjects (its cost is per subject), and the same-subset ratio is printed too.

Printed: events/s of the fast path (median of ``--repeats`` runs, one thread; wall time and
CPU time, the latter robust when other jobs share the machine), the speed-up ratios (CPU time),
and peak memory during the fast call (traced numpy/pandas allocations and sampled RSS)
over the input table's in-memory size.

Run::

    python benchmarks/ehr_interval_features.py                    # 10 M events / 100 k subjects
    python benchmarks/ehr_interval_features.py --events 1000000 --subjects 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time
import tracemalloc

# one core: the figures are per core, and numpy must not pick up a threaded BLAS anywhere
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402 -- after the thread settings above
import pandas as pd  # noqa: E402

from monai_twin.transforms.ehr import REDUCERS, EHRVocabulary, interval_feature_table  # noqa: E402


def synthetic_cohort(n_events: int, n_subjects: int, seed: int = 0, code_dtype: str = "str"):
    """Events (sorted by subject, time) and visits tables; ~10 % of events are drug start/stop pairs."""
    rng = np.random.default_rng(seed)
    n_visits = rng.integers(3, 8, size=n_subjects)
    gaps = np.round(rng.uniform(30, 400, size=int(n_visits.sum())), 2)
    starts = np.cumsum(n_visits) - n_visits
    gaps[starts] = 0.0
    cumulative = np.cumsum(gaps)
    visit_time = cumulative - np.repeat(cumulative[starts], n_visits)  # day 0 = each subject's first visit
    visit_subject = np.repeat(np.arange(n_subjects), n_visits)
    span = visit_time[np.cumsum(n_visits) - 1]

    n_rx = n_events // 20  # prescriptions -> 2 events each: 10 % of the table
    n_lab = n_events - 2 * n_rx
    lab_subject = np.sort(rng.integers(0, n_subjects, size=n_lab))
    lab_time = np.round(rng.uniform(-30, span[lab_subject] + 30), 2)  # 0.01-day grid: duplicate timestamps
    lab_code = rng.integers(0, 20, size=n_lab)
    lab_value = rng.normal(50 + lab_code, 10)
    lab_value[rng.random(n_lab) < 0.05] = np.nan
    rx_subject = rng.integers(0, n_subjects, size=n_rx)
    rx_start = np.round(rng.uniform(-60, span[rx_subject]), 2)
    rx_stop = rx_start + np.round(rng.uniform(0, 90, size=n_rx), 2)
    rx_drug = rng.integers(0, 2, size=n_rx)
    rx_dose = rng.choice([5.0, 10.0, 20.0, 40.0], size=n_rx)

    subject = np.concatenate([lab_subject, rx_subject, rx_subject])
    times = np.concatenate([lab_time, rx_start, rx_stop])
    lab_names = np.array([f"LAB//{k:02d}" for k in range(20)], dtype=object)
    drug_names = np.array(["DRUG//a", "DRUG//b"], dtype=object)
    code_ids = np.concatenate([lab_code, 20 + 2 * rx_drug, 21 + 2 * rx_drug])
    names = np.concatenate(
        [
            lab_names,
            [drug_names[0] + "//START", drug_names[0] + "//STOP", drug_names[1] + "//START", drug_names[1] + "//STOP"],
        ]
    )
    values = np.concatenate([lab_value, rx_dose, rx_dose])
    order = np.lexsort((times, subject))
    codes = pd.Categorical.from_codes(code_ids[order], categories=names)
    events = pd.DataFrame(
        {
            "subject_id": subject[order].astype(np.int64),
            "time": times[order],
            "code": codes if code_dtype == "category" else pd.Series(codes).astype("str"),
            "numeric_value": values[order],
        }
    )
    visits = pd.DataFrame({"subject_id": visit_subject.astype(np.int64), "time": visit_time})
    return events, visits


# ----------------------------------------------------------------------------------------------
# the reference: one subject at a time, in pandas


def reference_table(events: pd.DataFrame, visits: pd.DataFrame, vocab: EHRVocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Same (J, F) table as ``interval_feature_table`` (all reducers, exposure, days-since-last),
    computed by a per-subject ``groupby().apply`` -- the implementation one writes first."""
    n_codes, n_exp = len(vocab.feature_codes), len(vocab.exposure_codes)
    index = vocab.index(events["code"].astype(str))
    frame = pd.DataFrame(
        {
            "subject_id": events["subject_id"].to_numpy(),
            "time": events["time"].to_numpy(),
            "col": vocab.feature_column[index],
            "value": vocab.normalise(index, events["numeric_value"].to_numpy(dtype=float)),
            "xcol": vocab.exposure_column[index],
            "rate": np.where(
                vocab.exposure_sign[index] != 0,
                events["numeric_value"].fillna(0).to_numpy() * vocab.exposure_sign[index],
                0.0,
            ),
        }
    )
    visit_times = visits.groupby("subject_id")["time"].apply(lambda s: np.sort(s.to_numpy()))

    def one_subject(g: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        vt = visit_times[g.name]
        n_int = len(vt) - 1
        start, end = vt[:-1], vt[1:]
        iv = np.searchsorted(vt, g["time"].to_numpy(), side="right") - 1
        g = g.assign(iv=iv)
        d = g[(g["iv"] >= 0) & (g["iv"] < n_int) & (g["col"] >= 0)]
        blocks, masks = [], []
        counts = d.groupby(["iv", "col"]).size().unstack().reindex(index=range(n_int), columns=range(n_codes))
        dv = d[d["value"].notna()].sort_values(["time", "value"])
        agg = dv.groupby(["iv", "col"])["value"].agg(["last", "mean", "min", "max"])
        for name in REDUCERS:
            if name == "count":
                block = counts.fillna(0).to_numpy()
                blocks.append(block)
                masks.append(block > 0)
            else:
                block = agg[name].unstack().reindex(index=range(n_int), columns=range(n_codes)).to_numpy()
                blocks.append(block)
                masks.append(~np.isnan(block))
        ex = g[(g["xcol"] >= 0) & (g["rate"] != 0)]
        exposure = np.zeros((n_int, n_exp))
        active = np.zeros((n_int, n_exp), dtype=bool)
        for x, e in ex.groupby("xcol"):
            t, r = e["time"].to_numpy(), e["rate"].to_numpy()
            # integral of the running rate over [a, b): each change point contributes r * overlap
            overlap = np.clip(end[:, None] - np.maximum(start[:, None], t[None, :]), 0, None)
            exposure[:, x] = (overlap * r[None, :]).sum(axis=1)
            rate_at_start = (r[None, :] * (t[None, :] < start[:, None])).sum(axis=1)
            inside = ((t[None, :] >= start[:, None]) & (t[None, :] < end[:, None])).any(axis=1)
            active[:, x] = (rate_at_start > 1e-9) | inside
        blocks.append(exposure)
        masks.append(active)
        last_time = d.groupby(["iv", "col"])["time"].max().unstack().reindex(index=range(n_int), columns=range(n_codes))
        last_time = last_time.ffill()
        since = end[:, None] - last_time.to_numpy()
        blocks.append(np.where(np.isnan(since), -1.0, since))
        masks.append(~np.isnan(since))
        return np.concatenate(blocks, axis=1), np.concatenate(masks, axis=1)

    parts = frame.groupby("subject_id", sort=True).apply(one_subject, include_groups=False)
    features = np.concatenate([p[0] for p in parts], axis=0)
    mask = np.concatenate([p[1] for p in parts], axis=0)
    return np.where(np.isnan(features), 0.0, features), mask.astype(np.float32)


# ----------------------------------------------------------------------------------------------


class _RssSampler:
    """Peak resident memory of this process, sampled every 2 ms from /proc (Linux)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--subjects", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-subjects", type=int, default=1000, help="subjects the pandas reference runs on")
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--code-dtype", choices=("str", "category"), default="str")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    events, visits = synthetic_cohort(args.events, args.subjects, args.seed, args.code_dtype)
    input_bytes = int(events.memory_usage(deep=True).sum() + visits.memory_usage(deep=True).sum())
    print(
        f"table: {len(events):,} events, {args.subjects:,} subjects, {len(visits):,} visits, code dtype "
        f"{events['code'].dtype}; {input_bytes / 2**20:.0f} MiB in memory (built in {time.perf_counter() - t0:.1f} s)"
    )
    # fitted on a training share of subjects, as a pipeline would
    train = events[events["subject_id"] < int(args.subjects * 0.7)]
    vocab = EHRVocabulary.fit(train.iloc[: min(len(train), 2_000_000)])
    del train
    print(f"vocabulary: {vocab}")

    times, cpu_times = [], []
    for _ in range(args.repeats):
        gc.collect()
        t, c = time.perf_counter(), time.process_time()
        table = interval_feature_table(events, visits, vocab, check_units=False)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    fast, fast_cpu = statistics.median(times), statistics.median(cpu_times)
    print(f"fast: {table.features.shape[0]:,} interval rows x {table.features.shape[1]} features")
    print(
        f"fast: wall median {fast:.3f} s of {[round(x, 3) for x in times]} -> {len(events) / fast / 1e6:.2f} M events/s"
    )
    # CPU time of this single-threaded process = core-seconds; robust when other jobs share the cores
    print(
        f"fast: CPU median {fast_cpu:.3f} s of {[round(x, 3) for x in cpu_times]} -> "
        f"{len(events) / fast_cpu / 1e6:.2f} M events/s per core; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )

    # peak memory of one fast call
    del table
    gc.collect()
    tracemalloc.start()
    with _RssSampler() as rss:
        table = interval_feature_table(events, visits, vocab, check_units=False)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    output_bytes = table.features.nbytes + table.mask.nbytes
    print(
        f"memory: traced peak {traced_peak / 2**20:.0f} MiB = {traced_peak / input_bytes:.2f}x the input table; "
        f"RSS growth {(rss.peak - rss.base) / 2**20:.0f} MiB = {(rss.peak - rss.base) / input_bytes:.2f}x "
        f"(output itself {output_bytes / 2**20:.0f} MiB)"
    )

    # the reference on a random subset of subjects, checked equal to the fast rows
    rng = np.random.default_rng(args.seed + 1)
    chosen = np.sort(rng.choice(args.subjects, size=min(args.reference_subjects, args.subjects), replace=False))
    sub_events = events[events["subject_id"].isin(chosen)].reset_index(drop=True)
    sub_visits = visits[visits["subject_id"].isin(chosen)].reset_index(drop=True)
    ref_times, sub_times = [], []
    for _ in range(args.reference_repeats):
        c = time.process_time()
        ref_f, ref_m = reference_table(sub_events, sub_visits, vocab)
        ref_times.append(time.process_time() - c)
        c = time.process_time()
        sub_table = interval_feature_table(sub_events, sub_visits, vocab, check_units=False)
        sub_times.append(time.process_time() - c)
    rows = np.isin(table.subject_id, chosen)
    np.testing.assert_allclose(table.features[rows], ref_f, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(table.mask[rows], ref_m)
    np.testing.assert_array_equal(sub_table.features, table.features[rows])
    ref = statistics.median(ref_times)
    sub_fast = statistics.median(sub_times)
    print(
        f"reference (CPU time): {len(chosen):,} subjects ({len(sub_events):,} events): median {ref:.2f} s of "
        f"{[round(x, 2) for x in ref_times]} -> {len(sub_events) / ref / 1e3:.1f} k events/s; equal to the fast "
        "table on those rows (rtol 1e-5)"
    )
    extrapolated = ref * args.subjects / len(chosen)
    print(f"speed-up (CPU time), same {len(chosen):,} subjects: {ref / sub_fast:.0f}x (fast {sub_fast:.3f} s)")
    print(
        f"speed-up (CPU time), full table: {extrapolated / fast_cpu:.0f}x (reference extrapolated to "
        f"{args.subjects:,} subjects: {extrapolated:.0f} s)"
    )
    # the sorted-input shortcut: how much the one sort costs when the table comes unsorted
    shuffled = events.sample(frac=1.0, random_state=0).reset_index(drop=True)
    c = time.process_time()
    interval_feature_table(shuffled, visits, vocab, check_units=False)
    unsorted = time.process_time() - c
    print(f"unsorted input (one extra sort), CPU {unsorted:.3f} s -> {len(events) / unsorted / 1e6:.2f} M events/s")


if __name__ == "__main__":
    main()
