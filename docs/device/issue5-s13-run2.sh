#!/bin/bash
# Issue-5 device call (prepared in session 12), call 2 of 2, on the machine call 1 left warm:
# joins the default model from call 1's part and the one carried now (sha256 checked), then the
# model's GPU tests with FREEKV_REQUIRE_DEFAULT_MODEL=1, so that the default-model test
# (`default_model_freekv_matches_the_cpu_policy`: 210 freekv decode steps, GPU selections and
# logits against the CPU reference policy) fails rather than skips when the model is missing;
# then ncu, kernel by kernel, of oracle and freekv at a 16K context and batch 16 (3 steps
# each): which kernels grow (session 12: freekv's step grows with the context three times as
# fast as oracle's at batch 16); then, in the time left, the gather from host pools of 1, 8 and
# 32 GiB (`cuda_recall_pool_size`, chunks from cuMemHostAlloc and registered: does the gather
# slow down as the host KV grows?).
# Carry .device/m2, .device/ref and .device/t. From the repository root:
#   bash docs/device/issue5-s13-run2.sh [deadline s]
DL=${1:-560}; . "$(dirname "$0")/common.sh"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cat /tmp/m.part1 .device/m2/part > /tmp/model.gguf 2>/dev/null
[ "$(sha256sum /tmp/model.gguf | cut -d' ' -f1)" = "$SHA" ] && echo "default model joined, checksum ok" || echo "model checksum differs: the default-model test will fail"
export FREEKV_MODEL=/tmp/model.gguf FREEKV_REFERENCE_DIR=$PWD/.device/ref FREEKV_REQUIRE_DEFAULT_MODEL=1
model_tests
B=llama-3.1-8b+persistent=0.92
for p in oracle freekv; do PROF_BATCH=16 PROF_LIMIT=110 prof "${p}_16k_bs16" $D/cuda_freekv long-generation:16384:16 $p; done
t pool 220 env FREEKV_RECALL_POOL_GIB=1,8,32 $D/cuda_recall_bench --bench cuda_recall_pool_size
grep -E "^cuda_recall_pool_size|thrpt:" $L/pool.log | paste - - | sed -E 's/ +/ /g' | cut -c1-160
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
