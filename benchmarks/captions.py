"""Captions per second of a local captioner (`dynamicid-curate build --captioner DIR`) at batch sizes 1 / 16 / 64.

    .venv/bin/python benchmarks/captions.py --captioner DIR [--device cpu|cuda|auto] [--batches 1,16,64]
        [--limit 64] [--prompt TEXT]
    .venv/bin/python benchmarks/captions.py --tiny smolvlm|blip    (a tiny random model: tests the harness only)

`Captioner.caption` on `--limit` images, the batch sizes side by side in one run, each after one warm-up batch.
Images: photos of ../shared/data/faces/identities resized to 512x512 (the size of the crops the `caption` stage
feeds it), decoded beforehand. On the CPU the figures are per CPU-second (process time, pinned to one core, one
torch thread: other people's load on a shared machine counts little); on CUDA they are wall-clock, with
`torch.cuda.max_memory_allocated` per batch size. A batch that runs out of GPU memory is halved (said once); the
batch actually used is printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

from dynamicid.curation.captioner import Captioner, CaptionerError

DEFAULT_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces" / "identities"


def crops(root: Path, limit: int) -> list[Image.Image]:
    paths = sorted(p for p in root.rglob("*.*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(paths) // limit)
    return [Image.open(p).convert("RGB").resize((512, 512)) for p in paths[::step][:limit]]


def tiny_folder(kind: str) -> Path:
    from dynamicid.testing import save_tiny_blip, save_tiny_smolvlm

    folder = Path(tempfile.mkdtemp()) / f"tiny-{kind}"
    return (save_tiny_smolvlm if kind == "smolvlm" else save_tiny_blip)(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--captioner", type=Path, help="a local captioner folder (curation.captioner.SUPPORTED)")
    source.add_argument("--tiny", choices=("smolvlm", "blip"), help="a tiny random model built here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--prompt", help="the captioner's prompt [default: the architecture's]")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    args = parser.parse_args()

    import torch

    folder = args.captioner or tiny_folder(args.tiny)
    try:
        probe = Captioner(folder, device=args.device, prompt=args.prompt)
    except CaptionerError as error:
        parser.exit(2, f"benchmarks/captions.py: {error}\n")
    cuda = probe.device == "cuda"
    if not cuda:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        torch.set_num_threads(1)
    clock = time.perf_counter if cuda else time.process_time
    images = crops(args.photos, args.limit)
    gpu = torch.cuda.get_device_name() if cuda else "none"
    print(
        f"{probe.model} on {probe.device} ({platform.processor() or platform.machine()}, GPU {gpu}, torch "
        f"{torch.__version__}); {len(images)} images of 512x512; {'wall clock' if cuda else 'per CPU-second'}"
    )
    print(f"load average: {os.getloadavg()[0]:.1f}")
    print("| batch | used | captions/s | vs batch 1 | GPU max allocated |")
    print("|------:|-----:|-----------:|-----------:|------------------:|")
    first = None
    for batch in (int(b) for b in args.batches.split(",")):
        captioner = Captioner(folder, device=args.device, prompt=args.prompt, batch_size=batch)
        captioner.caption(images[:batch])  # warm-up: kernels, allocator
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = clock()
        captioner.caption(images)
        if cuda:
            torch.cuda.synchronize()
        rate = len(images) / (clock() - start)
        first = first or rate
        memory = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if cuda else "n/a"
        print(f"| {batch} | {captioner.batch_size} | {rate:.2f} | {rate / first:.2f}x | {memory} |")


if __name__ == "__main__":
    main()
