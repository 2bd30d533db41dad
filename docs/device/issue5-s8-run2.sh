#!/bin/bash
# Issue-5 device call 2 (session 8), right after call 1 on the same warm machine: the default
# model (SmolLM2-135M-Instruct Q4_1, 98 MB: more than one call carries) joined from the part call 1
# left in /tmp and the part carried now, checked against its sha256; then the GPU tests
# (select, attention, the model tests, the default-model test among them: 210 decode steps of
# freekv on the GPU against the CPU reference policy, same selections, logits within bf16
# tolerance). Needs .device/m2/part, .device/ref/text_1k.json, .device/t/{select,attention,
# cuda_freekv_test}. From the repository root: bash docs/device/issue5-s8-run2.sh SHA256 [deadline]
DL=${2:-400}; . "$(dirname "$0")/common.sh"
cat /tmp/m.part1 .device/m2/part > /tmp/model.gguf && echo "model: $(sha256sum /tmp/model.gguf | cut -c1-16)… expected ${1:0:16}…"
[ "$(sha256sum /tmp/model.gguf | cut -d' ' -f1)" = "$1" ] || { echo "model checksum differs: the default-model test will skip"; rm -f /tmp/model.gguf; }
export FREEKV_MODEL=/tmp/model.gguf FREEKV_REFERENCE_DIR=$PWD/.device/ref
t select 120 $D/select --test-threads=1
t attention 90 $D/attention --test-threads=1
t freekv_test 300 $D/cuda_freekv_test --test-threads=1 --nocapture
grep -E "^test .*(FAILED|ok)$|panicked|default model|skipped" "$L"/*.log | head -40
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
