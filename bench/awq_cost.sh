#!/bin/bash
# gptq vs awq vs awq+gptq on the 2-layer slice of the 1 GB bench model, 16 x 256 ids, one thread each
cd "$(dirname "$0")/.." && . .venv/bin/activate
M=${M:-bench/_work/llama-1GB-2L}   # the 2-layer slice of the 1 GB bench model (bench/gptq_vs_llmcompressor.py makes it);
# M=bench/_work/llama-1GB for the whole model (bench/synth.py --size 1GB), METHODS="gptq awq" for a subset
IDS=${IDS:-bench/_work/gptq-ids-16x256-vocab32000-seed0.safetensors}
for m in ${METHODS:-gptq awq awq+gptq}; do
  rm -rf bench/_work/cost-$m bench/_work/cost-$m.json
  OMP_NUM_THREADS=1 /usr/bin/time -v nice -n 5 qtool quantize $M -o bench/_work/cost-$m --method $m --calib $IDS --calib-samples 16 --seq-len 256 --quiet --report bench/_work/cost-$m.json 2> bench/_work/cost-$m.time
  echo "$m $(grep -E 'Elapsed|User time|System time|Maximum resident' bench/_work/cost-$m.time | tr -s ' ' | tr '\n' ';')"
done
