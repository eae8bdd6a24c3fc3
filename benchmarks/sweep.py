"""Lockstep sweep against separate train runs: N dictionaries trained on one activation stream.

(a) ``task = "sweep"`` with N TopK SAEs (different top_k) on the residual stream of SmolLM2-135M
over the built-in Python docs: every batch comes from one language-model pass and goes to all N;
(b) the same N items as N separate ``task = "train"`` runs (each item's
:func:`lmsae.tasks.sweep.item_train_config`), one after the other, each running the language model
over its own stream (calibration pass, shuffle-buffer fill, training batches).

Both sides get the language model already loaded (one instance, loaded before timing), so model
loading is not measured; everything else a run does is (stream, calibration, initialisation,
training, folding, saving). The script also checks that both sides saved bit-identical weights.

    .venv/bin/python benchmarks/sweep.py [--model smollm2-135m|tiny-random] [--tokens 8192] [--items 4]

Prints tokens/s of each (dictionary tokens trained per second, all items together) and the ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import resource
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import lmsae.tasks.sweep as sweep_task  # noqa: E402
import lmsae.tasks.train as train_task  # noqa: E402
from lmsae.config.base import RunConfig  # noqa: E402
from lmsae.models.transformer_lens import TransformerLensConfig, build_transformer_lens  # noqa: E402
from lmsae.registry import load_registry  # noqa: E402
from lmsae.runtime import RunContext  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sweep_config(args: argparse.Namespace, out: pathlib.Path, d_model: int) -> dict:
    ks = [8, 16, 32, 64, 128, 256][: args.items]
    text = {"type": "text", "dataset": {"path": "builtin:python-docs", "split": "train[:90%]"},
            "context_size": 128, "model_batch_size": 16}
    return {
        "task": "sweep", "output_dir": str(out), "overwrite": True, "device": "cpu",
        "model": {"backend": "transformer_lens", "model": args.model},
        "activations": {"batch_size": args.batch, "shuffle_buffer": args.shuffle, "sources": [text]},
        "trainer": {"total_training_tokens": args.tokens, "lr": 1e-3, "lr_warmup_steps": 2,
                    "calibration_batches": 2, "log_every": 1000},
        "initializer": {"decoder_bias": "mean"},
        "loggers": [{"type": "jsonl"}],
        "items": [{"name": f"k{k}", "dictionary": {"architecture": "sae", "hook_point_in": args.hook,
                                                   "d_model": d_model, "expansion_factor": args.expansion,
                                                   "act_fn": "topk", "top_k": k}} for k in ks],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m or tiny-random")
    parser.add_argument("--hook", default=None, help="default: blocks.3 (SmolLM2) / blocks.1 (tiny-random)")
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8192, help="training tokens of every item")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--shuffle", type=int, default=4096)
    parser.add_argument("--expansion", type=float, default=8.0)
    args = parser.parse_args()
    args.hook = args.hook or ("blocks.3.hook_resid_post" if args.model != "tiny-random" else "blocks.1.hook_resid_post")

    registry = load_registry()
    t = time.perf_counter()
    lm = build_transformer_lens(TransformerLensConfig(model=args.model, device="cpu"))
    load_s = time.perf_counter() - t
    d_model = int(lm.hooked.cfg.d_model)

    def shared_loader(_registry, config):  # every run reuses the loaded model
        return None if config is None else (lambda: lm)

    sweep_task.model_loader = shared_loader
    train_task.model_loader = shared_loader

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        data = sweep_config(args, root / "sweep", d_model)
        cfg = registry.structure(data, RunConfig)
        ctx = RunContext(registry=registry, out=io.StringIO(), progress=False)

        t = time.perf_counter()
        summary = sweep_task.run(cfg, ctx)
        sweep_s = time.perf_counter() - t

        t = time.perf_counter()
        for i in range(len(cfg.items)):
            train_cfg = sweep_task.item_train_config(cfg, i)
            plain = registry.unstructure(train_cfg)
            plain["output_dir"] = str(root / "separate" / cfg.items[i].name)
            train_task.run(registry.structure(plain, RunConfig), ctx)
        separate_s = time.perf_counter() - t

        identical = True
        for item in cfg.items:
            a = load_file(root / "sweep" / item.name / "sae_weights.safetensors")
            b = load_file(root / "separate" / item.name / "sae_weights.safetensors")
            identical &= a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    n = len(cfg.items)
    trained = summary["dictionary_tokens"]
    steps = summary["items"][0]["steps"]
    print(f"model {args.model} (loaded once in {load_s:.1f}s, not timed), hook {args.hook}, d_model {d_model}, "
          f"{n} TopK SAEs (k = {', '.join(str(it.dictionary.top_k) for it in cfg.items)}; "
          f"expansion {args.expansion:g}), {args.tokens:,} tokens each ({steps} steps of {args.batch}), "
          f"shuffle buffer {args.shuffle}, calibration 2 batches, torch threads {torch.get_num_threads()}")
    print(f"  (a) lockstep sweep       {trained / sweep_s:>9,.0f} dictionary tokens/s   {sweep_s:6.1f}s   "
          f"stream read once: {summary['stream']['tokens']:,} training tokens")
    print(f"  (b) {n} separate train runs {trained / separate_s:>9,.0f} dictionary tokens/s   {separate_s:6.1f}s")
    print(f"  ratio (a)/(b) tokens/s: {separate_s / sweep_s:.2f}x   weights bit-identical: {'yes' if identical else 'NO'}")
    print(f"  peak RSS {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
