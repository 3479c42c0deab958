#!/bin/bash
# device run: export ViT-B/16 zero-shot, then loop vs fvgpt classify (Ray Data) on 2000 images
set -x
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BENTOML_DO_NOT_TRACK=True
PY=${PY:-/opt/torch/.venv/bin/python3}
R=$(pwd)
O=${OUT:-/tmp/outlocal}; mkdir -p $O
MODEL=${MODEL:-ViT-B-16}; NIMG=${NIMG:-2000}; SITE=${SITE:-/tmp/site312}
CONFIGS=${CONFIGS:-"1:1:16 4:3.5:4 7:2:2"}
B=/tmp/bundle-$MODEL
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s)
step() { local lim=$1; shift; local s=$(date +%s%N); timeout -k 10 $lim "$@"; local rc=$?; echo >&2 "STEP rc=$rc $(( ($(date +%s%N)-s)/1000000 )) ms (t+$(( $(date +%s)-T0 )) s): $*"; return $rc; }
rayquiet() { for i in $(seq 20); do pgrep -f "raylet|gcs_server|default_worker" >/dev/null || return 0; sleep 0.5; done; echo >&2 "ray processes still alive"; pgrep -fa "raylet|gcs_server|default_worker" | cut -c1-120 >&2; }
nproc; lscpu | head -20; free -g | head -2; df -h /dev/shm /tmp | tail -2
if [ ! -d $SITE ]; then step 120 tar -xJf .devcarry/site312.tar.xz -C /tmp || exit 3; fi
P=/tmp/pp; rm -rf $P; mkdir -p $P; cp -r .devcarry/pp/*.egg-info $P/
ln -s $R/fvgpt $P/fvgpt; ln -s $R/runtime $P/fvgpt_runtime; ln -s $R/export $P/fvgpt_export
ln -s $R/serving $P/fvgpt_serving; ln -s $R/batch $P/fvgpt_batch; ln -s $R/benchmarks $P/benchmarks
export PYTHONPATH=$P:$SITE
step 60 $PY -c "import sys, ray, ray.data, pyarrow, pandas, onnxruntime, numpy, PIL, ftfy, open_clip, torch; print(sys.version, 'ray', ray.__version__, 'pyarrow', pyarrow.__version__, 'pandas', pandas.__version__, 'ort', onnxruntime.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__, 'open_clip', open_clip.__version__)" || exit 4
LABELS=cat,dog,car,plane,ship,bird,horse,frog,deer,truck
EXP="$PY -m fvgpt export --zero-shot --model $MODEL --pretrained none --labels $LABELS --out $B --parity-images 16 --force"
if [ ! -f $B/manifest.json ]; then
  step 240 $EXP --precision int8 ${EXPORT_EXTRA} 2>&1 | tee /tmp/exp1.txt; rc=${PIPESTATUS[0]}
  if [ $rc != 0 ]; then
    if grep -qiE "parity|top-1|refus" /tmp/exp1.txt && ! grep -qiE "opset|onnxscript|NOT_IMPLEMENTED|Attention" /tmp/exp1.txt; then
      step 200 $EXP || step 200 $EXP --opset 18 || exit 5
    else
      step 200 $EXP --precision int8 --opset 18 || step 200 $EXP --opset 18 || exit 5
    fi
  fi
fi
ls -la $B
step 120 $PY -c "from pathlib import Path; from benchmarks.batch import write_images; write_images(Path('/tmp/imgs'), $NIMG)" || exit 6
ls /tmp/imgs | wc -l
ray_run() {  # PREC K C TH
  local PREC=$1 K=$2 C=$3 TH=$4 try rc w s
  for try in 1 2; do
    rayquiet; rm -rf /tmp/o; s=$(date +%s%N)
    step 240 $PY -m fvgpt classify $B --input /tmp/imgs --out /tmp/o --runtime onnx --precision $PREC --batch-size 32 --actors $K --actor-cpus $C --threads $TH --quiet > /tmp/stdout.txt
    rc=$?; w=$(( ($(date +%s%N)-s)/1000000 ))
    [ $rc = 0 ] && break
  done
  cat /tmp/stdout.txt
  echo "{\"precision\": \"$PREC\", \"actors\": $K, \"actor_cpus\": $C, \"threads\": $TH, \"rc\": $rc, \"try\": $try, \"outer_wall_ms\": $w, \"summary\": $(tail -1 /tmp/stdout.txt | grep '^{' || echo null)}" >> $O/ray_summaries.jsonl
}
loop_run() {  # PREC
  rm -rf /tmp/loop; step 240 $PY -m benchmarks.batch --bundle $B --runtime onnx --precision $1 --images $NIMG --methods loop --out /tmp/loop
  cp /tmp/loop/batch.json $O/loop_$1.json
}
elapsed() { echo $(( $(date +%s)-T0 )); }
loop_run fp32
for c in $CONFIGS; do IFS=: read K C TH <<< "$c"; ray_run fp32 $K $C $TH; cp /tmp/o/summary.json $O/summary_fp32_K$K.json; done
if [ $(elapsed) -lt ${EXTRA_BEFORE:-330} ]; then ray_run fp32 2 7 8; fi
if [ $(elapsed) -lt ${INT8_BEFORE:-340} ] && [ -f $B/tower.int8.onnx ]; then
  loop_run int8; ray_run int8 1 1 16; ray_run int8 4 3.5 4
  if [ $(elapsed) -lt ${EXTRA_BEFORE:-330} ]; then ray_run int8 7 2 2; fi
fi
echo "DONE t+$(( $(date +%s)-T0 )) s"
