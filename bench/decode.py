"""Decode benchmark: koala-batch's VAE decode against the pipeline's own, side by side.

`gpu.decode_comparison` on the device at hand (SDXL's VAE architecture, random weights):
koala-batch's `decode_latents` (uint8 on the device, a pinned host copy) against what
StableDiffusionXLPipeline does for output_type="np" (`vae.decode`, then
`image_processor.postprocess`, then uint8 on the host). bench/gpu.py runs the same
measurement on a GPU; this runs it anywhere, a CPU included.

    python -m bench.decode --size 512 --batch 2 --dtype float32
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import common, gpu

NAME = "decode"


def main(argv: list[str] | None = None) -> int:
    """Measure, print and write bench/results/decode-<device>-<time>.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side (default: 512)")
    parser.add_argument("--batch", type=int, default=2, help="images per decode (default: 2)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="the model dtype the decode follows (default: auto)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = parser.parse_args(argv)
    common.quiet_libraries()

    import torch

    torch.set_num_threads(args.threads)
    settings: dict[str, Any] = vars(args) | {"vae": "SDXL architecture, random weights"}
    result = gpu.decode_comparison(argparse.Namespace(**vars(args), dry_run=False))
    common.print_table([result], list(result), title="decode: koala-batch vs diffusers")
    print(f"wrote {common.write_result(NAME, settings, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
