#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) on the CPU: the peer of FreeKV-rs's end-to-end CPU matrix.

Same GGUF file, same prompt files as `cargo xtask bench`, greedy decoding. For each prompt:
prefill time of the whole prompt (one eval call), then N greedy decode steps timed one by one
(sample + eval of one token). Prints one JSON object per prompt and writes them all with --json.

usage: llamacpp_decode.py --model M.gguf --prompts CTX=FILE[,CTX=FILE...] [--n 64]
                          [--threads 2] [--json out.json]
"""

import argparse
import json
import sys
import time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="CTX=FILE pairs, comma separated")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("peer llamacpp: not installed (pip install llama-cpp-python)")
        sys.exit(3)
    pairs = []
    for item in a.prompts.split(","):
        ctx, _, path = item.partition("=")
        with open(path, encoding="utf-8") as f:
            pairs.append((int(ctx), f.read()))
    n_ctx = max(c for c, _ in pairs) * 2 + a.n + 64
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=n_ctx, n_threads=a.threads,
                          n_threads_batch=a.threads, n_batch=512, verbose=False)
    rows = []
    for ctx, text in pairs:
        toks = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        t = time.perf_counter()
        llm.eval(toks)
        prefill = time.perf_counter() - t
        steps = []
        for _ in range(a.n):
            t = time.perf_counter()
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
            steps.append(time.perf_counter() - t)
        steps.sort()
        med = steps[len(steps) // 2]
        row = dict(peer="llama-cpp-python", version=getattr(llama_cpp, "__version__", "?"),
                   target_context=ctx, prompt_tokens=len(toks), threads=a.threads,
                   prefill_tok_s=len(toks) / prefill, decode_tok_s=a.n / sum(steps),
                   decode_step_median_ms=med * 1e3, new_tokens=a.n)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
