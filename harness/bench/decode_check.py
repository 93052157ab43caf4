"""nvJPEG against libjpeg-turbo on a generated folder: how far the device pipeline's pixels are
from the CPU pipeline's, how fast each decodes a batch, and which decoder really ran: on CUDA the
check fails (``status: failed``, exit 1 from the command) when nvJPEG was asked for and a batch
was decoded on the CPU instead. ``python -m harness.bench.decode_check WORKDIR OUT.json``: the
first 256 JPEGs under WORKDIR."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from harness.data.decode import Decoder, as_encoded
from harness.data.pipeline import BatchTransform
from harness.runtime import synchronize


def compare(files: list[str], device: torch.device, make_decoder=Decoder) -> dict:
    """The figures of the module docstring; ``make_decoder(device, on_device=...)`` builds the
    decoders (a test forces a fallback through it)."""
    from PIL import Image

    from harness.data.transforms import make_transform

    encoded = [as_encoded(Path(f).read_bytes()) for f in files]
    out: dict = {"files": len(files), "device": str(device)}
    device_decoder = make_decoder(device, on_device=True)
    for name, decoder in (("device", device_decoder), ("cpu", make_decoder(device, on_device=False))):
        decoder(encoded[:8], files[:8])  # warm-up (nvJPEG handle, allocator)
        synchronize(device)
        start = time.perf_counter()
        decoded = decoder(encoded, files)
        synchronize(device)
        out[f"decode_{name}_img_s"] = round(len(files) / (time.perf_counter() - start), 1)
        out[f"_{name}"] = decoded
    diffs = [(a.int() - b.int()).abs() for a, b in zip(out.pop("_device"), out.pop("_cpu"))]
    out["decode_max_abs_diff"] = int(max(int(d.max()) for d in diffs))
    out["decode_mean_abs_diff"] = round(float(np.mean([float(d.float().mean()) for d in diffs])), 4)
    cfg = SimpleNamespace(
        data=SimpleNamespace(
            image_size=224,
            resize_size=256,
            augment="standard",
            test_resize="short",
            random_erasing=0.0,
            decode="device",
        )
    )
    cpu = torch.stack([make_transform(cfg.data, train=False)(Image.open(f).convert("RGB")) for f in files])
    bt = BatchTransform.from_config(cfg.data, (0.5,) * 3, (0.5,) * 3, device, train=False, geometry=True)
    ours = bt._geometry(make_decoder(device, on_device=True)(encoded, files), np.random.default_rng(0)).cpu()
    d = (ours.int() - cpu.int()).abs()
    out["test_transform_max_abs_diff"] = int(d.max())
    out["test_transform_mean_abs_diff"] = round(float(d.float().mean()), 4)
    out["decoder"] = device_decoder.used()
    wanted = "nvjpeg" if device_decoder.gpu else "cpu"
    if out["decoder"] != wanted:  # the "device" figures would be another decoder's
        out["status"] = "failed"
        out["error"] = f"nvJPEG was asked for and the batches were decoded by {out['decoder']}"
    return out


def main(argv: list[str]) -> int:
    workdir, dest = Path(argv[0]), Path(argv[1])
    files = sorted(str(p) for p in workdir.rglob("*.jpg"))[:256]
    if not files:
        print(f"no JPEG under {workdir}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = compare(files, device)
    dest.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 1 if result.get("status") == "failed" else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
