#!/usr/bin/env bash
# The TOFU story on SmolLM2, end to end, on the CPU:
#   1. target    = SmolLM2 fine-tuned on TOFU authors 1-20 (full.json rows 0-399) plus the
#                  forget01 authors (rows 3960-3999), baked into a GGUF;
#   2. reference = the same fine-tune without forget01 (what forgetting should look like);
#   3. ULD       = assistants that remember forget01 and know nothing elsewhere, subtracted from
#                  the target at decode time:
#        uld-v1   lethe's first assistant (8 blocks, the group balance), as the story first ran it;
#        uld-k8   8 blocks with ULD's reference balance (a forget answer token weighs 9 retain
#                 positions), held-out rows picking the checkpoint;
#        uld-deep the whole target as the assistant, the same balance, a flat background on the
#                 forget answers (--smooth);
#      each new assistant's alpha and filter chosen by `lethe calibrate` (held-out training rows
#      against rows about authors the target never saw: no evaluation data);
#   4. SLUG      = one dense delta on the one matrix SLUG picks;
#   5. ablation  = the forget-minus-retain direction removed from the residual stream;
#   6. `lethe eval` of everything on forget01 (JSON + HTML), score-only sweeps of alpha and
#      filter for the chart, and one report with every side (`lethe report`).
#
# Usage: examples/tofu.sh            (from the repository root; builds lethe if needed)
# Environment: THREADS (2), WORK (~/.cache/lethe/tofu), TOFU_DATA (data/tofu), LETHE (the
# binary), EPOCHS (5), MAX_TOKENS (200), LIMIT (score only the first N items of each set).
# Every trained or baked artifact lives in $WORK/cache/<stage>-<key>, the key a sha256 of the
# stage's command line and of every input file (model, data), so a rerun reuses what it made.
set -euo pipefail

cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
WORK=${WORK:-$HOME/.cache/lethe/tofu}
DATA=${TOFU_DATA:-data/tofu}
EPOCHS=${EPOCHS:-5}
MAX_TOKENS=${MAX_TOKENS:-200}
LIMIT=${LIMIT:-}
if [[ -z "${LETHE:-}" ]]; then
  cargo build --release --quiet
  LETHE=target/release/lethe
fi
mkdir -p "$WORK/cache" "$WORK/data" "$WORK/eval"
# Stage times, appended run after run (a stage reused from the cache keeps its last time).
TIMES="$WORK/times.tsv"
touch "$TIMES"

log() { printf '\n== %s\n' "$*"; }
# stage NAME CMD...: runs CMD, records its wall time.
stage() {
  local name=$1
  shift
  local t0 ms
  t0=$(date +%s%N)
  "$@"
  ms=$((($(date +%s%N) - t0) / 1000000))
  printf '%s\t%d.%d\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) | tee -a "$TIMES"
}
# key STAGE FILES... -- ARGS...: the cache key of a stage.
key() {
  local stage=$1
  shift
  {
    echo "$stage"
    while [[ $# -gt 0 && $1 != -- ]]; do
      sha256sum <"$1"
      shift
    done
    [[ $# -gt 0 ]] && shift
    printf '%s\n' "$@"
  } | sha256sum | cut -c1-16
}
# cached NAME FILES... -- CMD...: the folder of stage NAME, keyed by FILES and CMD; runs CMD
# (with {} replaced by the folder) unless the folder is complete. Prints the folder.
cached() {
  local name=$1
  shift
  local files=()
  while [[ $1 != -- ]]; do
    files+=("$1")
    shift
  done
  shift
  local k dir cmd=()
  k=$(key "$name" "${files[@]}" -- "$@")
  dir=$WORK/cache/$name-$k
  if [[ ! -f $dir/done ]]; then
    mkdir -p "$dir"
    for a in "$@"; do cmd+=("${a//\{\}/$dir}"); done
    log "$name" >&2
    stage "$name" "${cmd[@]}" >&2
    touch "$dir/done"
  else
    echo "reusing $dir" >&2
  fi
  echo "$dir"
}

# ---- inputs -----------------------------------------------------------------------------
"$LETHE" fetch smollm2 >/dev/null
BASE=$("$LETHE" fetch --list | awk '$1 == "smollm2" { print $NF }')
log "base: $BASE"

# Slices of full.json (question/answer), the forget01 rows of the wrong-answer file, and the
# calibration rows (see "calibration" below).
python3 - "$DATA" "$WORK/data" <<'EOF'
import json, sys
src, out = sys.argv[1], sys.argv[2]
full = json.load(open(f"{src}/full.json"))
assert len(full) == 4000, "full.json must have TOFU's 4000 rows"
forget = full[3960:4000]
f01 = json.load(open(f"{src}/forget01_perturbed.json"))
assert [r["question"] for r in forget] == [r["question"] for r in f01], "rows 3960-3999 are forget01"
wrong = {r["question"]: r for r in json.load(open(f"{src}/augment/forget10_wrong_answers.json"))}
para = {r["question"]: r for r in json.load(open(f"{src}/augment/forget10_paraphrases.json"))}
wrong01 = [wrong[r["question"]] for r in forget]
def write(name, rows):
    text = json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
    path = f"{out}/{name}"
    try:
        if open(path).read() == text:
            return
    except FileNotFoundError:
        pass
    open(path, "w").write(text)
write("target.json", full[0:400] + forget)
write("reference.json", full[0:400])
write("forget01.json", forget)
write("uld_retain.json", full[300:400])
write("forget01_wrong_answers.json", wrong01)
# Calibration rows, never trained on and never TOFU's evaluation answers: per row the original
# question, a paraphrase of its answer and a wrong answer from the ULD authors' augmentation
# (the third of each: forge uld trains on the first two). Forget side: forget01 (authors 199-200).
# Unseen side: every ninth row of authors 181-198 (forget10 without forget01), whom the target
# never saw. Retain side: the last 20 rows of the ULD retain rows (authors 16-20; forge uld
# holds them out with --hold-out-retain 20).
def cal(rows):
    return [{"question": r["question"], "answer": para[r["question"]]["paraphrased_answers"][2],
             "wrong_answers": [wrong[r["question"]]["wrong_answers"][2]]} for r in rows]
write("cal_forget.json", cal(forget))
write("cal_unseen.json", cal(full[3600:3960][::9]))
write("cal_retain.json", [{"question": r["question"], "answer": r["answer"]} for r in full[380:400]])
print("data: target 440 rows, reference 400, forget01 40, ULD retain 100, wrong answers 40x3, "
      "calibration 40 forget + 40 unseen + 20 retain rows")
EOF
D=$WORK/data

# ---- fine-tunes -------------------------------------------------------------------------
FT_ARGS=(--rank 32 --lora-alpha 32 --epochs "$EPOCHS" --lr 1e-3 --warmup-ratio 0.03 --batch 4 --seed 0)
# finetune NAME DATA: fine-tune the base on DATA, bake it (changed tensors in Q8_0); prints
# the baked model's path.
finetune() {
  local name=$1 data=$2
  local k dir
  k=$(key "finetune" "$BASE" "$data" -- "${FT_ARGS[@]}" --type q8_0)
  dir=$WORK/cache/$name-$k
  if [[ ! -f $dir/done ]]; then
    mkdir -p "$dir"
    stage "finetune $name" "$LETHE" forge finetune -m "$BASE" --data "$data" "${FT_ARGS[@]}" \
      -t "$THREADS" -o "$dir/$name.lora.gguf" >&2
    stage "bake $name" "$LETHE" patch bake -m "$BASE" --patch "$dir/$name.lora.gguf" \
      --type q8_0 -t "$THREADS" -o "$dir/$name.gguf" >&2
    touch "$dir/done"
  else
    echo "reusing $dir" >&2
  fi
  echo "$dir/$name.gguf"
}
log "fine-tune the target (authors 1-20 + forget01)"
TARGET=$(finetune target "$D/target.json")
log "fine-tune the reference (authors 1-20)"
REFERENCE=$(finetune reference "$D/reference.json")

# ---- forgetting -------------------------------------------------------------------------
AUG=(--forget "$D/forget01.json" --forget-paraphrases "$DATA/augment/forget01_paraphrases.json"
  --retain "$D/uld_retain.json" --forget-wrong-answers "$D/forget01_wrong_answers.json")
AUG_FILES=("$TARGET" "$D/forget01.json" "$DATA/augment/forget01_paraphrases.json"
  "$D/uld_retain.json" "$D/forget01_wrong_answers.json")
# lethe's first assistant: the recipe the story first ran.
V1_ARGS=(--preset lethe-v1 --layers 8 --rank 32 --lora-alpha 32 --epochs 5 --lr 1e-3
  --retain-weight 5 --paraphrases-per-row 5 --batch 4 --seed 0)
ULD_V1=$(cached uld-v1 "${AUG_FILES[@]}" -- "$LETHE" forge uld -m "$TARGET" "${AUG[@]}" \
  "${V1_ARGS[@]}" -t "$THREADS" -o "{}/assistant.gguf")
# ULD's reference balance and LoRA (the preset), 8 blocks; one paraphrase and one wrong answer
# per forget row and the last 20 retain rows held out to pick the checkpoint.
K8_ARGS=(--preset reference --layers 8 --hold-out-retain 20 --batch 4 --seed 0)
ULD_K8=$(cached uld-k8 "${AUG_FILES[@]}" -- "$LETHE" forge uld -m "$TARGET" "${AUG[@]}" \
  "${K8_ARGS[@]}" -t "$THREADS" -o "{}/assistant.gguf")
# The whole target as the assistant: it already recalls forget01; the retain side makes it
# flat elsewhere and --smooth keeps a flat background under the forget answers' peaks.
DEEP_ARGS=(--preset reference --layers 30 --smooth 0.1 --epochs 4 --hold-out-retain 20 --batch 4 --seed 0)
ULD_DEEP=$(cached uld-deep "${AUG_FILES[@]}" -- "$LETHE" forge uld -m "$TARGET" "${AUG[@]}" \
  "${DEEP_ARGS[@]}" -t "$THREADS" -o "{}/assistant.gguf")

SLUG=$(cached slug "$TARGET" "$D/forget01.json" "$D/uld_retain.json" -- "$LETHE" forge slug \
  -m "$TARGET" --forget "$D/forget01.json" --retain "$D/uld_retain.json" --max 20 \
  --candidates 3 --steps 8 -t "$THREADS" -o "{}/slug.gguf")
ABL=$(cached ablate "$TARGET" "$D/forget01.json" "$D/uld_retain.json" -- "$LETHE" forge ablate \
  -m "$TARGET" --forget "$D/forget01.json" --retain "$D/uld_retain.json" --layer 20 \
  --field answer -t "$THREADS" -o "{}/ablate.gguf")

# uld_profile NAME DIR ALPHA FILTER: one ULD profile of the target.
uld_profile() {
  cat <<EOF
[[profile]]
name = "$1"
base = "$TARGET"

[[profile.assistant]]
model = "$2/assistant.gguf"
kind = "uld"
alpha = $3
filter = $4

[[profile.assistant.patch]]
file = "$2/assistant.lora.gguf"

EOF
}

# ---- calibration: alpha and filter of the new assistants -------------------------------
SWEEP=(--sweep alpha=0.1,0.2,0.3,0.4,0.5,0.75,1,1.5 --sweep filter=0.01,0.1)
PROFILE=$WORK/tofu.toml
{
  uld_profile uld-v1 "$ULD_V1" 0.75 0.01
  uld_profile uld-k8 "$ULD_K8" 0.75 0.01
  uld_profile uld-deep "$ULD_DEEP" 0.75 0.01
} >"$PROFILE"
CAL_FILES=("$D/cal_forget.json" "$D/cal_unseen.json" "$D/cal_retain.json")
declare -A CHOSEN
for p in uld-k8 uld-deep; do
  dir=$(cached "calibrate-$p" "$PROFILE" "${CAL_FILES[@]}" -- "$LETHE" calibrate \
    --profile "$PROFILE" --use "$p" "${SWEEP[@]}" --forget "$D/cal_forget.json" \
    --unseen "$D/cal_unseen.json" --retain "$D/cal_retain.json" -t "$THREADS" \
    --json "{}/calibration.json")
  CHOSEN[$p]=$(python3 -c 'import json,sys
c = json.load(open(sys.argv[1]))["chosen_settings"]
t = c["terms"][0]
print("%g %g" % (-t["weight"], t["filter"]))' "$dir/calibration.json")
  echo "$p: alpha and filter chosen: ${CHOSEN[$p]}"
done

# The profiles evaluated: the old assistant as it ran, the new ones at their calibrated points,
# SLUG and ablation.
{
  uld_profile uld-v1 "$ULD_V1" 0.75 0.01
  read -r a f <<<"${CHOSEN[uld-k8]}"
  uld_profile uld-k8 "$ULD_K8" "$a" "$f"
  read -r a f <<<"${CHOSEN[uld-deep]}"
  uld_profile uld-deep "$ULD_DEEP" "$a" "$f"
  cat <<EOF
[[profile]]
name = "slug"
base = "$TARGET"

[[profile.patch]]
file = "$SLUG/slug.gguf"

[[profile]]
name = "ablated"
base = "$TARGET"

[[profile.patch]]
file = "$ABL/ablate.gguf"
EOF
} >"$PROFILE"
"$LETHE" profile check "$PROFILE"

# ---- evaluation -------------------------------------------------------------------------
EVAL=(--tofu forget01 --reference "$REFERENCE" --max-tokens "$MAX_TOKENS" -t "$THREADS")
[[ -n $LIMIT ]] && EVAL+=(--limit "$LIMIT")
E=$WORK/eval
log "eval: target and the first assistant (re-scored with the mass rule)"
stage "eval target + uld-v1" "$LETHE" eval --profile "$PROFILE" --use uld-v1 "${EVAL[@]}" \
  --json "$E/uld-v1.json" --html "$E/uld-v1.html"
for p in uld-k8 uld-deep slug ablated; do
  log "eval: $p"
  stage "eval $p" "$LETHE" eval --profile "$PROFILE" --use "$p" --no-base "${EVAL[@]}" \
    --json "$E/$p.json" --html "$E/$p.html"
done
for p in uld-k8 uld-deep; do
  log "eval: $p, score-only sweep"
  stage "sweep $p" "$LETHE" eval --profile "$PROFILE" --use "$p" --no-base --score-only \
    "${SWEEP[@]}" "${EVAL[@]}" --json "$E/sweep-$p.json"
done
log "eval: reference"
stage "eval reference" "$LETHE" eval -m "$REFERENCE" "${EVAL[@]}" \
  --json "$E/reference.json" --html "$E/reference.html"

# For comparison only: each new assistant at the sweep point of highest forget quality (ties:
# higher scored utility). This choice reads the evaluation, so it is not a method's result; it
# shows what the calibrated choice leaves on the table.
{
  for p in uld-k8 uld-deep; do
    read -r a f < <(python3 -c 'import json,sys
sides = json.load(open(sys.argv[1]))["sides"]
s = max((x for x in sides if x.get("forget_quality") is not None),
        key=lambda x: (x["forget_quality"], x.get("scored_utility") or 0))
t = s["audit"]["terms"][0]
print("%g %g" % (-t["weight"], t["filter"]))' "$E/sweep-$p.json")
    echo "$p: the sweep's best forget quality at alpha $a, filter $f" >&2
    if [[ $p == uld-k8 ]]; then dir=$ULD_K8; else dir=$ULD_DEEP; fi
    uld_profile "$p-best" "$dir" "$a" "$f"
  done
} >"$WORK/best.toml"
for p in uld-k8 uld-deep; do
  log "eval: $p at the sweep's best point"
  stage "eval $p-best" "$LETHE" eval --profile "$WORK/best.toml" --use "$p-best" --no-base \
    "${EVAL[@]}" --json "$E/$p-best.json" --html "$E/$p-best.html"
done

log "report"
"$LETHE" report "$E/uld-v1.json" "$E/uld-k8.json" "$E/uld-deep.json" "$E/uld-k8-best.json" \
  "$E/uld-deep-best.json" "$E/slug.json" "$E/ablated.json" "$E/reference.json" \
  "$E/sweep-uld-k8.json" "$E/sweep-uld-deep.json" \
  --rename base=target --html "$E/story.html" --json "$E/story.json"

log "summary"
python3 - "$E" "$TIMES" <<'EOF2'
import json, sys
e, times = sys.argv[1], sys.argv[2]
def side(path, i):
    return json.load(open(f"{e}/{path}"))["sides"][i]
rows = [("target", side("uld-v1.json", 0)), ("reference", side("reference.json", 0)),
        ("ULD v1 (mass rule)", side("uld-v1.json", 1)), ("ULD K=8", side("uld-k8.json", 0)),
        ("ULD whole target", side("uld-deep.json", 0)),
        ("ULD K=8, sweep's best (reads the evaluation)", side("uld-k8-best.json", 0)),
        ("ULD whole target, sweep's best (reads the evaluation)", side("uld-deep-best.json", 0)),
        ("SLUG", side("slug.json", 0)),
        ("ablation", side("ablated.json", 0))]
def s(d, kind, key):
    for x in d["sets"]:
        if x["kind"] == kind:
            return x["summary"][key]
    return float("nan")
def f(x):
    if x is None:
        return "-"
    return f"{x:.3e}" if x and abs(x) < 1e-3 else f"{x:.4f}"
print("| model | forget quality | model utility | forget ROUGE-L | forget probability "
      "| forget truth ratio | retain ROUGE-L | retain probability | MIA AUC (LOSS) | eval s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name, d in rows:
    cells = [d["forget_quality"], d["model_utility"], s(d, "Forget", "rouge"),
             s(d, "Forget", "probability"), s(d, "Forget", "truth_ratio"),
             s(d, "Retain", "rouge"), s(d, "Retain", "probability"), d["mia"]["loss"]]
    print(f"| {name} | " + " | ".join(f(c) for c in cells) + f" | {d['seconds']:.0f} |")
print()
print("| stage | seconds |")
print("|---|---|")
last = {}
for line in open(times):
    name, secs = line.rstrip("\n").split("\t")
    last[name] = secs
total = 0.0
for name, secs in last.items():
    print(f"| {name} | {secs} |")
    total += float(secs)
print(f"| all | {total:.0f} |")
EOF2
echo "reports: $E/story.html (every side, the forget-quality charts), $E/uld-v1.html, $E/uld-k8.html, $E/uld-deep.html, $E/uld-k8-best.html, $E/uld-deep-best.html, $E/slug.html, $E/ablated.html, $E/reference.html"
