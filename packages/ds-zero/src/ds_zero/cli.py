"""``ds zero-to-fp32 CHECKPOINT_DIR OUT``: consolidate a ZeRO checkpoint into one safetensors file.

Registered under the ``ds.cli`` entry-point group (see ds-core's ``ds`` command); the work is done by
:func:`ds_zero.consolidate.zero_to_fp32`, which streams one tensor at a time.
"""

from __future__ import annotations

import argparse
import time

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ds zero-to-fp32",
        description="Consolidate a ZeRO checkpoint (stages 0-3, any number of ranks) into one plain "
                    "safetensors state dict with fp32 parameters.")
    parser.add_argument("checkpoint_dir", help="the save_dir given to save_checkpoint (uses 'latest'), "
                                               "or one tag's directory")
    parser.add_argument("output_file", help="the .safetensors file to write")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in 'latest')")
    args = parser.parse_args(argv)
    from .consolidate import zero_to_fp32

    start = time.perf_counter()
    count = zero_to_fp32(args.checkpoint_dir, args.output_file, tag=args.tag)
    print(f"wrote {count} tensors to {args.output_file} in {time.perf_counter() - start:.2f} s")
    return 0
