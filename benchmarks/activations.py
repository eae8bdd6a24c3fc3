"""Activation generation: lmsae's pipeline against a bare TransformerLens loop, in the same run.

Both read the same packed 128-token windows of the built-in corpus with SmolLM2-135M and stop
the forward pass after the block of the hook point. The bare loop calls
``HookedTransformer.run_with_cache(stop_at_layer=...)`` on pre-tokenised batches; lmsae runs the
whole path a training run uses: dataset -> tokenisation -> packing -> forward -> masks ->
activation factory (flattening to tokens, fixed batches) with and without background prefetching.

    .venv/bin/python benchmarks/activations.py [--sequences 256] [--hook blocks.3.hook_resid_post]

Prints tokens/s of each and the overhead ratio (lmsae time / bare time; 1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from lmsae.activations.factory import ActivationsConfig  # noqa: E402
from lmsae.data.datasets import DatasetConfig  # noqa: E402
from lmsae.models.transformer_lens import TransformerLensConfig, build_transformer_lens, stop_at_layer_for  # noqa: E402
from lmsae.registry import load_registry  # noqa: E402
from lmsae.sources.text_source import TextSourceConfig  # noqa: E402
from lmsae.tasks.common import stream_builder  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--model-batch", type=int, default=16)
    parser.add_argument("--hook", default="blocks.3.hook_resid_post")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    registry = load_registry()
    lm = build_transformer_lens(TransformerLensConfig(model=args.model, device="cpu"))
    source = TextSourceConfig(dataset=DatasetConfig(path="builtin:python-docs"), context_size=args.context,
                              model_batch_size=args.model_batch, max_sequences=args.sequences)

    # the windows both sides use, tokenised once for the bare loop
    windows = []
    for chunk in stream_builder(registry, ActivationsConfig(sources=[source], layout="sequences",
                                                            batch_size=args.model_batch, prefetch=0),
                                (args.hook,), language_model=lambda: lm, progress=False)():
        windows.append(chunk["tokens"])
    tokens = torch.cat(windows)
    n_tokens = tokens.numel()
    stop = stop_at_layer_for([args.hook])

    def bare() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, tokens.shape[0], args.model_batch):
                _, cache = lm.hooked.run_with_cache(tokens[i:i + args.model_batch], names_filter=[args.hook],
                                                    stop_at_layer=stop)
                cache[args.hook].sum()
        return time.perf_counter() - t

    def ours(prefetch: int) -> float:
        cfg = ActivationsConfig(sources=[source], batch_size=2048, prefetch=prefetch, remainder="keep")
        t = time.perf_counter()
        seen = 0
        for batch in stream_builder(registry, cfg, (args.hook,), language_model=lambda: lm, progress=False)():
            batch[args.hook].sum()
            seen += batch[args.hook].shape[0]
        return time.perf_counter() - t

    bare()  # warm-up
    results = {"bare run_with_cache loop": min(bare() for _ in range(args.repeats)),
               "lmsae factory (prefetch=0)": min(ours(0) for _ in range(args.repeats)),
               "lmsae factory (prefetch=2)": min(ours(2) for _ in range(args.repeats))}
    base = results["bare run_with_cache loop"]
    print(f"model {args.model}, hook {args.hook} (stop_at_layer={stop}), {args.sequences} x {args.context} tokens, "
          f"model batch {args.model_batch}, torch threads {torch.get_num_threads()}")
    for name, seconds in results.items():
        print(f"  {name:<28} {n_tokens / seconds:>9,.0f} tokens/s   time ratio vs bare {seconds / base:5.3f}")
    print(f"  peak RSS {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
