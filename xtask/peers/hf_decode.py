#!/usr/bin/env python3
"""Hugging Face transformers decode-step timing, the peer of freekv-model's cuda_decode bench.

Same shapes as the synthetic models of freekv-model (random bf16 weights built from a config,
no download), full KV on the GPU, the KV filled with random values instead of a prefill (a
decode step reads the same bytes whatever they hold). Two forms:

* eager: SDPA attention, DynamicCache;
* compiled: StaticCache, torch.compile(mode="reduce-overhead") (CUDA graphs).

One step = forward of one token per sequence, argmax on the device, token ids read back to the
host (as the Rust bench does). Prints one JSON object per configuration and a markdown table.

usage: hf_decode.py [--model llama-3.1-8b] [--configs 1:4096,8:4096,...] [--steps 20]
                    [--warmup 5] [--deadline-s 300] [--compile-reserve-s 0]
                    [--forms eager,compiled] [--json out.json]
       hf_decode.py --bandwidth-only   (host -> device pinned and device copy bandwidth, one
                                        JSON line; the ceilings of `cargo xtask bench`)
"""

import argparse
import json
import sys
import time

import torch

SHAPES = {
    "llama-3.1-8b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256),
    "qwen-2.5-7b": dict(num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
                        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_model(name):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(max_position_embeddings=131072, tie_word_embeddings=(name == "smollm2-135m"),
                      attn_implementation="sdpa", **SHAPES[name])
    torch.manual_seed(0)
    t = time.time()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    model = model.to(dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():  # random weights, std 0.02 (norms stay 1)
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    log(f"built {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} G params "
        f"in {time.time() - t:.1f} s")
    return model, cfg


def kv_shape(cfg, b, n):
    d = cfg.hidden_size // cfg.num_attention_heads
    return (b, cfg.num_key_value_heads, n, d)


def dynamic_cache(cfg, b, ctx):
    from transformers import DynamicCache
    try:
        cache = DynamicCache(config=cfg)
    except TypeError:
        cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(kv_shape(cfg, b, ctx), device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cache.update(k, v, layer)
    return cache


def static_cache(cfg, b, ctx, max_len):
    from transformers import StaticCache
    try:
        cache = StaticCache(config=cfg, max_cache_len=max_len)
    except TypeError:
        cache = StaticCache(config=cfg, max_batch_size=b, max_cache_len=max_len,
                            device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(ctx, device="cuda")
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(kv_shape(cfg, b, ctx), device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cache.update(k, v, layer, cache_kwargs={"cache_position": pos})
    return cache


def time_steps(fwd, b, ctx, warmup, steps):
    tok = torch.ones((b, 1), dtype=torch.long, device="cuda")
    times = []
    for i in range(warmup + steps):
        pos = ctx + i
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = fwd(tok, pos)
        nxt = logits[:, -1, :].argmax(dim=-1)
        ids = nxt.tolist()  # read back to the host, as the Rust bench does
        tok = torch.tensor(ids, dtype=torch.long, device="cuda").view(b, 1)
        times.append(time.perf_counter() - t)
    meas = sorted(times[warmup:])
    return meas[len(meas) // 2] * 1e3


def run(model, cfg, form, b, ctx, warmup, steps, compiled_model):
    with torch.no_grad():
        if form == "eager":
            cache = dynamic_cache(cfg, b, ctx)

            def fwd(tok, pos):
                p = torch.full((b, 1), pos, dtype=torch.long, device="cuda")
                return model(input_ids=tok, past_key_values=cache, position_ids=p,
                             use_cache=True).logits
        else:
            cache = static_cache(cfg, b, ctx, ctx + warmup + steps + 8)

            def fwd(tok, pos):
                cp = torch.tensor([pos], dtype=torch.long, device="cuda")
                p = cp.view(1, 1).expand(b, 1)
                return compiled_model(input_ids=tok, past_key_values=cache, position_ids=p,
                                      cache_position=cp, use_cache=True).logits
        t = time.time()
        ms = time_steps(fwd, b, ctx, warmup, steps)
        wall = time.time() - t
        del cache
        torch.cuda.empty_cache()
    return ms, wall


def bandwidth(gib=1, reps=10):
    """Host -> device bandwidth from pinned memory and device copy bandwidth (read + written),
    medians of `reps` copies of `gib` GiB, timed with CUDA events."""
    n = gib << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty_like(dev)

    def timed(fn):
        out = []
        for _ in range(reps + 2):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            out.append(s.elapsed_time(e) / 1e3)
        out = sorted(out[2:])
        return out[len(out) // 2]

    h2d = timed(lambda: dev.copy_(host, non_blocking=True))
    d2h = timed(lambda: host.copy_(dev, non_blocking=True))
    d2d = timed(lambda: dev2.copy_(dev))
    return dict(device=torch.cuda.get_device_name(0), bytes=n, h2d_pinned_gbs=n / h2d / 1e9,
                d2h_pinned_gbs=n / d2h / 1e9, d2d_copy_gbs=2 * n / d2d / 1e9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bandwidth-only", action="store_true")
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--configs", default="1:4096,8:4096,32:4096,1:32768,8:32768")
    ap.add_argument("--forms", default="eager,compiled")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compiled-warmup", type=int, default=8)
    ap.add_argument("--deadline-s", type=float, default=300.0)
    # A compiled configuration starts only when this much is left before the deadline
    # (compilation takes 35-70 s per batch size on an H200).
    ap.add_argument("--compile-reserve-s", type=float, default=0.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.bandwidth_only:
        print(json.dumps(bandwidth()), flush=True)
        return
    t0 = time.time()
    import transformers
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.cuda.get_device_name(0)}")
    model, cfg = build_model(a.model)
    configs = [tuple(int(x) for x in c.split(":")) for c in a.configs.split(",") if c]
    compiled_model = None
    rows = []
    for form in a.forms.split(","):
        if form == "compiled":
            torch._dynamo.config.cache_size_limit = 64
            compiled_model = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for (b, ctx) in configs:
            row = dict(peer="hf-transformers", form=form, model=f"synthetic:{a.model}", batch=b,
                       context=ctx, ms_per_step=None, note="")
            reserve = a.compile_reserve_s if form == "compiled" else 0.0
            if time.time() - t0 > a.deadline_s:
                row["note"] = f"skipped: past the {a.deadline_s:.0f} s deadline"
            elif time.time() - t0 + reserve > a.deadline_s:
                row["note"] = (f"skipped: a compile ({reserve:.0f} s reserved) does not fit before "
                               f"the {a.deadline_s:.0f} s deadline")
            else:
                kv_gb = 2 * 2 * cfg.num_hidden_layers * b * ctx * kv_shape(cfg, 1, 1)[1] * \
                    kv_shape(cfg, 1, 1)[3] / 1e9
                free = torch.cuda.mem_get_info()[0] / 1e9
                if kv_gb * (2.1 if form == "eager" else 1.05) > free:
                    row["note"] = f"does not fit: KV {kv_gb:.1f} GB, {free:.1f} GB free"
                else:
                    try:
                        w = a.warmup if form == "eager" else a.compiled_warmup
                        ms, wall = run(model, cfg, form, b, ctx, w, a.steps, compiled_model)
                        row["ms_per_step"] = ms
                        row["note"] = f"{wall:.1f} s incl. warm-up/compile"
                    except Exception as e:  # report and go on with the next configuration
                        row["note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                        torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("| form | batch | context | HF ms/step | tokens/s | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ms = r["ms_per_step"]
        ms_s = "-" if ms is None else "%.2f" % ms
        tps = "-" if ms is None else "%.0f" % (r["batch"] * 1e3 / ms)
        print(f"| {r['form']} | {r['batch']} | {r['context']} | {ms_s} | {tps} | {r['note']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                           transformers=transformers.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
