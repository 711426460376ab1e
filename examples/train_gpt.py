"""Train a small byte-level GPT on text bundled with this repository, on CPU ranks, then generate.

    ds run --nproc 2 examples/train_gpt.py --config examples/configs/gpt_cpu.json

The corpus is the repository's own documentation and source (Markdown and Python files), read as
bytes, so nothing is downloaded. Edit the JSON config (batch sizes, optimizer, scheduler, precision,
steps_per_print, ...) — it is a DeepSpeed config and ds reads it unchanged.

At the end the checkpoint just written is loaded for inference with ``ds_infer.init_inference``
(the native model and its static-KV-cache decoder) and a sample is generated from a prompt, with
the decode speed in tokens/s: training and inference in one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

import ds_core
from ds_core.testing.models import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


class ByteWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes: inputs and next-byte targets."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, i: int):
        chunk = self.data[i * self.seq_len: (i + 1) * self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]


def load_corpus(limit_bytes: int) -> torch.Tensor:
    files = sorted(p for pattern in ("**/*.md", "**/*.py") for p in ROOT.glob(pattern)
                   if ".nox" not in p.parts and ".git" not in p.parts and "shared" not in p.parts)
    text = b"\n".join(p.read_bytes() for p in files)[:limit_bytes]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples/configs/gpt_cpu.json"))
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000)
    parser.add_argument("--save-dir", default="runs/train_gpt_checkpoint",
                        help="the checkpoint written at the end (and loaded back for the sample)")
    parser.add_argument("--hf-dir", default="runs/train_gpt_hf",
                        help="the trained model written as a Hugging Face directory (for `ds serve`)")
    parser.add_argument("--prompt", default="The engine ", help="prompt of the generated sample")
    parser.add_argument("--sample-tokens", type=int, default=64, help="tokens to generate (0: no sample)")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core per rank on small machines
    ds_core.init_distributed()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, seq_len=args.seq_len, dim=args.dim, layers=args.layers,
                          heads=args.heads))
    dataset = ByteWindows(load_corpus(args.corpus_bytes), args.seq_len)
    engine, _, loader, _ = ds_core.initialize(model=model, training_data=dataset, config=args.config)
    rank = engine.global_rank
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"[train_gpt] {params / 1e6:.2f}M parameters, {len(dataset)} windows of {args.seq_len} bytes, "
              f"{engine.world_size} ranks, micro-batch {engine.train_micro_batch_size_per_gpu()} × "
              f"accumulation {engine.gradient_accumulation_steps()} = global batch "
              f"{engine.train_batch_size()}, precision {engine.precision}", flush=True)

    losses: list[float] = []
    epoch, batches = 0, iter(loader)
    start = time.perf_counter()
    while engine.global_steps < args.steps:
        try:
            x, y = next(batches)
        except StopIteration:
            epoch += 1
            loader.sampler.set_epoch(epoch)
            batches = iter(loader)
            continue
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        if engine.micro_steps % engine.gradient_accumulation_steps() == 0:
            losses.append(engine.last_loss)
    elapsed = time.perf_counter() - start

    if args.save_dir:
        engine.save_checkpoint(args.save_dir)
    peaks = engine.throughput.peak_memory_per_rank()
    engine.destroy()
    if rank == 0:
        head = sum(losses[:10]) / min(10, len(losses))
        tail = sum(losses[-10:]) / min(10, len(losses))
        print(f"[train_gpt] done: {engine.global_steps} steps in {elapsed:.1f} s | loss {head:.3f} -> "
              f"{tail:.3f} (mean of first/last 10 steps) | "
              f"{engine.global_samples / elapsed:.1f} samples/s | "
              f"{engine.global_samples * args.seq_len / elapsed:,.0f} tokens/s | peak memory per rank "
              f"{', '.join(f'{p / 2**20:.0f} MiB' for p in peaks)}", flush=True)
    if rank == 0 and args.save_dir and args.sample_tokens > 0:
        sample(args, model.cfg)
    if dist.is_initialized():  # an orderly teardown: gloo's threads are joined before the interpreter exits
        dist.barrier()
        dist.destroy_process_group()


def sample(args: argparse.Namespace, cfg: GPTConfig) -> None:
    """Load the checkpoint with ds_infer and generate from ``args.prompt`` (rank 0)."""
    try:
        import ds_infer
    except ImportError:
        print("[train_gpt] ds-infer is not installed: `pip install ds-infer` to generate a sample", flush=True)
        return
    with torch.device("meta"):  # no weights of its own: they come from the checkpoint
        shell = GPT(cfg)
    engine = ds_infer.init_inference(shell, checkpoint=args.save_dir, replace_with_kernel_inject=True,
                                     dtype=torch.float32, device="cpu")
    prompt = torch.tensor([list(args.prompt.encode())])
    new = min(args.sample_tokens, cfg.seq_len - prompt.shape[1])
    stamps: list[float] = []
    out = engine.generate(prompt, max_new_tokens=new, do_sample=True, temperature=0.7, top_k=20, seed=0,
                          streamer=lambda step, tokens: stamps.append(time.perf_counter()))
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    print(f"[train_gpt] inference: {args.save_dir} loaded by ds_infer.init_inference in {engine.load_seconds:.2f} s; "
          f"{len(stamps)} tokens sampled at {rate:,.0f} tokens/s decode:\n{text}", flush=True)
    if args.hf_dir:  # the same weights as a Hugging Face directory with a byte tokenizer: `ds serve` it
        ds_infer.save_pretrained(engine, args.hf_dir)
        try:
            ds_infer.save_byte_tokenizer(args.hf_dir)
            print(f"[train_gpt] serve it: ds serve {args.hf_dir}", flush=True)
        except Exception as exc:  # tokenizers/transformers are optional
            print(f"[train_gpt] {args.hf_dir} written without a tokenizer ({exc})", flush=True)


if __name__ == "__main__":
    main()
