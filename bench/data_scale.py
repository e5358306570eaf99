"""Benchmark: ``tftransfer.data.from_directory`` vs ``keras.utils.image_dataset_from_directory``
on image folders of real size (issue 12).

Writes N JPEGs of 320x240 in 20 class folders (smooth random scenes with
noise, about 20 KB each) under ``--root`` (default ``/tmp/tftransfer-bench``),
kept between runs. For each N (default 5,000 and 20,000) it runs each loader
in a fresh process, alternating, at ``image_size=(224, 224)`` and
``validation_split=0.2``, and measures

* listing: the loader call (no batch read yet),
* epoch 1 and epoch 2: a full pass over train and validation,
* peak RSS growth: the highest RSS (sampled every 10 ms) minus the RSS
  before the loader call (TensorFlow imported and initialised); with the
  memory cache, also as a multiple of ``data.cache_bytes`` (the estimate
  ``cache="auto"`` compares with the budget).

tftransfer runs with its defaults (``cache="auto"``: in memory when both
splits fit the cache budget, 10% of RAM unless ``--budget`` /
``$TFTRANSFER_CACHE_BUDGET`` says otherwise). When ``auto`` chose the memory
cache, ``cache=False`` is measured as well, so the growth without a cache
shows at every N, and so is Keras's loader followed by ``.cache()`` (what a
Keras user writes for fast later epochs: a first epoch that also fills a
cache, of float32 images).

Usage:
    python bench/data_scale.py [--sizes 5000,20000] [--rounds 1] [--budget 2GB]

The last line is ``data_rss_ratio: <peak RSS growth, tftransfer / Keras, at the largest N>``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.join("/tmp", "tftransfer-bench")
CLASSES, WIDTH, HEIGHT = 20, 320, 240
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ images
def _write_chunk(args):
    import numpy as np
    from PIL import Image

    folder, start, stop = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        scene = np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), Image.BICUBIC), np.int16)
        noisy = np.clip(scene + rng.normal(0, 6, scene.shape), 0, 255).astype(np.uint8)
        name = os.path.join(folder, f"class_{i % CLASSES:02d}", f"{i:06d}.jpg")
        Image.fromarray(noisy).save(name, quality=90)


def image_folder(root, n):
    """``root/n<N>/class_XX/*.jpg``, written once (a marker says it is complete)."""
    import multiprocessing

    folder = os.path.join(root, f"n{n}")
    if os.path.exists(os.path.join(folder, ".complete")):
        return folder
    for c in range(CLASSES):
        os.makedirs(os.path.join(folder, f"class_{c:02d}"), exist_ok=True)
    chunks = [(folder, s, min(s + 500, n)) for s in range(0, n, 500)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(_write_chunk, chunks)
    open(os.path.join(folder, ".complete"), "w").close()
    return folder


# ------------------------------------------------------------------ child
class _PeakRSS(threading.Thread):
    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.process, self.peak, self.running = psutil.Process(), 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)


def _passes(datasets):
    count = 0
    for ds in datasets:
        for images, _ in ds:
            count += int(images.shape[0])
    return count


def child(loader, folder, cache):
    """Runs one loader; prints one JSON line of its figures."""
    import psutil
    import tensorflow as tf

    tf.constant(1.0) + 1  # the runtime up before the baseline
    import keras

    from tftransfer import data as tfd

    base = psutil.Process().memory_info().rss
    sampler = _PeakRSS()
    sampler.start()
    start = time.perf_counter()
    if loader in ("keras", "keras-cache"):
        train, val = keras.utils.image_dataset_from_directory(
            folder, image_size=(224, 224), validation_split=0.2, subset="both", seed=1337,
            batch_size=32, verbose=False)
        decided = "none"
        if loader == "keras-cache":
            train, val, decided = train.cache(), val.cache(), "memory (float32)"
    else:
        data = tfd.from_directory(folder, image_size=(224, 224), validation_split=0.2,
                                  batch_size=32, cache=cache)
        train, val, decided = data.train, data.validation, data.cache or "none"
    figures = {"listing": time.perf_counter() - start, "cache": decided,
               "cache_bytes": None if loader != "ours" else data.cache_bytes}
    for epoch in (1, 2):
        start, cpu = time.perf_counter(), time.process_time()
        figures["images"] = _passes([train, val])
        figures[f"epoch{epoch}"] = time.perf_counter() - start
        figures[f"cpu{epoch}"] = time.process_time() - cpu  # steadier on a shared machine
    sampler.running = False
    sampler.join()
    figures["rss_growth"] = (max(sampler.peak, psutil.Process().memory_info().rss) - base) / 1e9
    print("RESULT " + json.dumps(figures), flush=True)


# ------------------------------------------------------------------ parent
def run_child(loader, folder, cache="auto", budget=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    if budget:
        env["TFTRANSFER_CACHE_BUDGET"] = budget
    out = subprocess.run([sys.executable, __file__, "--child", loader, "--folder", folder,
                          "--cache", str(cache)], env=env, capture_output=True, text=True,
                         check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{loader} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def median_of(runs):
    keys = ("listing", "epoch1", "epoch2", "cpu1", "cpu2", "rss_growth")
    return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in keys}}


def measure(folder, rounds, budget):
    runs = {"tftransfer": [], "keras": []}
    for r in range(rounds):
        order = ("tftransfer", "keras") if r % 2 == 0 else ("keras", "tftransfer")
        for name in order:
            runs[name].append(run_child(name if name == "keras" else "ours", folder,
                                        budget=budget))
            print(f"  {name}: {runs[name][-1]}", flush=True)
    result = {name: median_of(values) for name, values in runs.items()}
    paired = [ours["epoch1"] / theirs["epoch1"] for ours, theirs in zip(runs["tftransfer"], runs["keras"])]
    result["tftransfer"]["paired"] = paired  # per round: the two loaders ran back to back
    if result["tftransfer"]["cache"] == "memory":
        nocache = [run_child("ours", folder, "False", budget) for _ in range(rounds)]
        result["tftransfer cache=False"] = median_of(nocache)
        print(f"  tftransfer cache=False: {nocache[-1]}", flush=True)
        cached = [run_child("keras-cache", folder) for _ in range(rounds)]
        result["keras + .cache()"] = median_of(cached)
        print(f"  keras + .cache(): {cached[-1]}", flush=True)
    return result


def table(results):
    rows = ["| N | loader | cache | listing s | epoch 1 s (CPU s) | epoch 2 s (CPU s) | "
            "peak RSS growth GB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, result in results.items():
        for name, f in result.items():
            rows.append(f"| {n} | {name} | {f['cache']} | {f['listing']:.2f} | "
                        f"{f['epoch1']:.1f} ({f['cpu1']:.1f}) | {f['epoch2']:.1f} ({f['cpu2']:.1f}) | "
                        f"{f['rss_growth']:.3f} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--root", default=ROOT)
    parser.add_argument("--budget", default=None,
                        help="TFTRANSFER_CACHE_BUDGET for tftransfer (default: 10%% of RAM)")
    parser.add_argument("--child", choices=("ours", "keras", "keras-cache"))
    parser.add_argument("--folder")
    parser.add_argument("--cache", default="auto")
    args = parser.parse_args(argv)
    if args.child:
        cache = {"auto": "auto", "False": False}[args.cache]
        return child(args.child, args.folder, cache)
    import psutil

    from tftransfer import _memory  # noqa: F401  (the budget the children use)

    if args.budget:
        os.environ[_memory.ENV] = args.budget
    print(f"cores {os.cpu_count()}, RAM {psutil.virtual_memory().total / 2**30:.1f} GiB, "
          f"cache budget {_memory.show(_memory.budget())} "
          f"({args.budget or os.environ.get(_memory.ENV) or 'default: 10% of RAM'})", flush=True)
    results = {}
    for n in (int(s) for s in args.sizes.split(",")):
        start = time.perf_counter()
        folder = image_folder(args.root, n)
        print(f"N={n}: folder {folder} ready in {time.perf_counter() - start:.0f} s", flush=True)
        results[n] = measure(folder, args.rounds, args.budget)
    print()
    print(table(results))
    print()
    for n, result in results.items():
        ours, keras_ = result["tftransfer"], result["keras"]
        print(f"N={n}: listing {ours['listing']:.2f} s vs {keras_['listing']:.2f} s; epoch 1 "
              f"ratio {ours['epoch1'] / keras_['epoch1']:.2f} (CPU "
              f"{ours['cpu1'] / keras_['cpu1']:.2f}); epoch 2 ratio "
              f"{ours['epoch2'] / keras_['epoch2']:.2f}; RSS growth ratio "
              f"{ours['rss_growth'] / keras_['rss_growth']:.2f} (tftransfer cache: {ours['cache']}); "
              f"epoch 1 ratio per round {', '.join(f'{r:.2f}' for r in ours['paired'])}")
        if ours["cache"] == "memory":
            cached = result["keras + .cache()"]
            print(f"N={n}: a first epoch that fills a memory cache: tftransfer {ours['epoch1']:.1f} s "
                  f"vs Keras + .cache() {cached['epoch1']:.1f} s (ratio "
                  f"{ours['epoch1'] / cached['epoch1']:.2f}, CPU {ours['cpu1'] / cached['cpu1']:.2f}); "
                  f"peak RSS growth {ours['rss_growth']:.2f} vs {cached['rss_growth']:.2f} GB")
            print(f"N={n}: the memory cache's peak RSS growth {ours['rss_growth']:.3f} GB for "
                  f"{ours['cache_bytes'] / 1e9:.3f} GB of uint8 images "
                  f"({ours['rss_growth'] * 1e9 / ours['cache_bytes']:.2f}x)")
    sizes = list(results)
    if len(sizes) > 1:
        low, high = ({**r, **{"nocache": r.get("tftransfer cache=False", r["tftransfer"])}}
                     for r in (results[sizes[0]], results[sizes[-1]]))
        print(f"peak RSS growth without a cache, N={sizes[0]} -> {sizes[-1]}: tftransfer "
              f"{low['nocache']['rss_growth']:.3f} -> {high['nocache']['rss_growth']:.3f} GB, "
              f"Keras {low['keras']['rss_growth']:.3f} -> {high['keras']['rss_growth']:.3f} GB")
    last = results[sizes[-1]]
    print(f"data_rss_ratio: {last['tftransfer']['rss_growth'] / last['keras']['rss_growth']:.2f}")


if __name__ == "__main__":
    main()
