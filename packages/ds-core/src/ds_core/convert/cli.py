"""``ds convert-deepspeed CKPT_DIR OUT_DIR``: a DeepSpeed checkpoint directory to a ds checkpoint."""

from __future__ import annotations

import argparse

__all__ = ["main"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ds convert-deepspeed",
        description="Convert a DeepSpeed checkpoint (ZeRO stage 0-3, any world size) into a ds checkpoint that "
                    "engine.load_checkpoint(OUT_DIR) resumes at any world size. The DeepSpeed files are read "
                    "with a restricted unpickler: no DeepSpeed import, no code from the files runs.")
    parser.add_argument("ckpt_dir", help="DeepSpeed save_dir (holding 'latest') or one of its tag directories")
    parser.add_argument("out_dir", help="ds checkpoint directory to write (its 'latest' names the new tag)")
    parser.add_argument("--tag", default=None, help="DeepSpeed tag to convert (default: the one 'latest' names)")
    parser.add_argument("--out-tag", default=None, help="tag to write (default: the DeepSpeed tag's name)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="lay the partitions out for this many data-parallel ranks (default: the DeepSpeed "
                             "run's; ds re-partitions on load anyway)")
    parser.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=None,
                        help="ZeRO stage of the ds run that will resume it (default: the DeepSpeed run's)")
    args = parser.parse_args(argv)
    from .deepspeed import read_deepspeed, write_ds

    state = read_deepspeed(args.ckpt_dir, args.tag)
    out = write_ds(state, args.out_dir, args.out_tag or state.path.name, args.world_size, args.stage)
    params = sum(sum(g.numels) for g in state.groups)
    print(f"converted DeepSpeed {state.ds_version} ZeRO stage {state.stage} checkpoint {state.path} "
          f"({state.world_size} ranks, {len(state.groups)} parameter group(s), {params:,} trainable parameters, "
          f"step {state.global_steps}, {state.precision}) -> {out}")
    return 0
