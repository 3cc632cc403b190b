"""Inference batch size on a CPU thread: speed and peak memory of the cpu profile's backbones.

    python benchmarks/eval_batch.py [--sizes 8,16,32,64,128] [--images 256] [--resolution 128]

Each (backbone, batch) runs in its own process (one thread, as a search worker runs), so its
peak resident memory (VmHWM) is its own; the sizes are interleaved and the whole sweep is
repeated, so a noisy moment lands on every size. It also checks that batches of 16 give the
same outputs as one batch of 128. Writes `benchmarks/eval_batch.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BACKBONES = ("mobilenetv2_100", "tf_efficientnet_lite0", "tf_efficientnet_lite1")

_ONE = """
import json, re, sys, time, torch, timm
torch.set_num_threads(1)
name, bs, n, res = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
m = timm.create_model(name, pretrained=False).eval()
x = torch.rand(n, 3, res, res)
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
before = hwm()  # the model and the input in memory; nothing run yet
with torch.inference_mode():
    m(x[:bs])  # warm-up
    t0 = time.perf_counter()
    out = torch.cat([m(x[i : i + bs]) for i in range(0, n, bs)])
    dt = time.perf_counter() - t0
    peak = hwm()
    same = None
    if bs == 16:
        same = bool(torch.equal(out[:128], m(x[:128])))
print(json.dumps({"ms_per_image": 1000 * dt / n, "peak_growth_mb": (peak - before) / 1024,
                  "identical_to_128": same}))
"""


def run_one(name: str, bs: int, n: int, res: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _ONE, name, str(bs), str(n), str(res)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8,16,32,64,128")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("eval_batch.json"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[str, dict[int, list[dict]]] = {b: {s: [] for s in sizes} for b in BACKBONES}
    for _ in range(args.repeats):
        for name in BACKBONES:
            for bs in sizes:
                r = run_one(name, bs, args.images, args.resolution)
                runs[name][bs].append(r)
                print(name, bs, r, flush=True)
    table = {}
    for name, by in runs.items():
        table[name] = {
            str(bs): {
                "ms_per_image": round(min(r["ms_per_image"] for r in rs), 2),
                "peak_growth_mb": round(max(r["peak_growth_mb"] for r in rs), 1),
                **(
                    {"identical_to_128": all(r["identical_to_128"] for r in rs)} if bs == 16 else {}
                ),
            }
            for bs, rs in by.items()
        }
    args.out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/eval_batch.py " + " ".join(sys.argv[1:]),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, one thread "
                f"per run, {platform.platform()}",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "images": args.images,
                "resolution": args.resolution,
                "note": "ms_per_image: the best of the repeats; peak_growth_mb: VmHWM growth "
                "over the passes (model and input already held), the largest of the repeats",
                "backbones": table,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if not Path("/proc/self/status").is_file():
        raise SystemExit("needs Linux /proc (VmHWM)")
    main()
