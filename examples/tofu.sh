#!/usr/bin/env bash
# The TOFU story on SmolLM2, end to end, on the CPU:
#   1. target    = SmolLM2 fine-tuned on TOFU authors 1-20 (full.json rows 0-399) plus the
#                  forget01 authors (rows 3960-3999), baked into a GGUF;
#   2. reference = the same fine-tune without forget01 (what forgetting should look like);
#   3. ULD       = an assistant (the target's first 8 blocks + a LoRA) that remembers forget01
#                  (with the paraphrase augmentation) and is uniform on authors 16-20 and on
#                  wrong answers to the forget questions; subtracted from the target at decode;
#   4. SLUG      = one dense delta on the one matrix SLUG picks;
#   5. ablation  = the forget-minus-retain direction removed from the residual stream;
#   6. `lethe eval` of all five on forget01 (JSON + HTML reports) and a summary table.
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

# ---- inputs -----------------------------------------------------------------------------
"$LETHE" fetch smollm2 >/dev/null
BASE=$("$LETHE" fetch --list | awk '$1 == "smollm2" { print $NF }')
log "base: $BASE"

# Slices of full.json (question/answer) and the forget01 rows of the wrong-answer file.
python3 - "$DATA" "$WORK/data" <<'EOF'
import json, sys
src, out = sys.argv[1], sys.argv[2]
full = json.load(open(f"{src}/full.json"))
assert len(full) == 4000, "full.json must have TOFU's 4000 rows"
forget = full[3960:4000]
f01 = json.load(open(f"{src}/forget01_perturbed.json"))
assert [r["question"] for r in forget] == [r["question"] for r in f01], "rows 3960-3999 are forget01"
wrong = json.load(open(f"{src}/augment/forget10_wrong_answers.json"))
qs = {r["question"] for r in forget}
wrong01 = [r for r in wrong if r["question"] in qs]
assert len(wrong01) == 40, len(wrong01)
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
print("data: target 440 rows, reference 400, forget01 40, ULD retain 100, wrong answers 40x3")
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
ULD_ARGS=(--layers 8 --rank 32 --lora-alpha 32 --epochs 5 --lr 1e-3 --retain-weight 5
  --paraphrases-per-row 5 --batch 4 --seed 0)
k=$(key "uld" "$TARGET" "$D/forget01.json" "$D/uld_retain.json" "$DATA/augment/forget01_paraphrases.json" \
  "$D/forget01_wrong_answers.json" -- "${ULD_ARGS[@]}")
ULD=$WORK/cache/uld-$k
if [[ ! -f $ULD/done ]]; then
  log "ULD assistant"
  mkdir -p "$ULD"
  stage "forge uld" "$LETHE" forge uld -m "$TARGET" --forget "$D/forget01.json" \
    --forget-paraphrases "$DATA/augment/forget01_paraphrases.json" \
    --retain "$D/uld_retain.json" --forget-wrong-answers "$D/forget01_wrong_answers.json" \
    "${ULD_ARGS[@]}" -t "$THREADS" -o "$ULD/assistant.gguf"
  touch "$ULD/done"
fi

SLUG_ARGS=(--max 20 --candidates 3 --steps 8)
k=$(key "slug" "$TARGET" "$D/forget01.json" "$D/uld_retain.json" -- "${SLUG_ARGS[@]}")
SLUG=$WORK/cache/slug-$k
if [[ ! -f $SLUG/done ]]; then
  log "SLUG"
  mkdir -p "$SLUG"
  stage "forge slug" "$LETHE" forge slug -m "$TARGET" --forget "$D/forget01.json" \
    --retain "$D/uld_retain.json" "${SLUG_ARGS[@]}" -t "$THREADS" -o "$SLUG/slug.gguf"
  touch "$SLUG/done"
fi

ABL_ARGS=(--layer 20 --field answer)
k=$(key "ablate" "$TARGET" "$D/forget01.json" "$D/uld_retain.json" -- "${ABL_ARGS[@]}")
ABL=$WORK/cache/ablate-$k
if [[ ! -f $ABL/done ]]; then
  log "ablation"
  mkdir -p "$ABL"
  stage "forge ablate" "$LETHE" forge ablate -m "$TARGET" --forget "$D/forget01.json" \
    --retain "$D/uld_retain.json" "${ABL_ARGS[@]}" -t "$THREADS" -o "$ABL/ablate.gguf"
  touch "$ABL/done"
fi

# One profile file for the three ways of forgetting, all on the target.
PROFILE=$WORK/tofu.toml
cat >"$PROFILE" <<EOF
[[profile]]
name = "uld"
base = "$TARGET"
description = "ULD: the target minus 0.75 x its forget01 assistant"

[[profile.assistant]]
model = "$ULD/assistant.gguf"
kind = "uld"
alpha = 0.75
filter = 0.01

[[profile.assistant.patch]]
file = "$ULD/assistant.lora.gguf"
scale = 1.0

[[profile]]
name = "slug"
base = "$TARGET"
description = "SLUG: one matrix stepped along its forget gradient"

[[profile.patch]]
file = "$SLUG/slug.gguf"
scale = 1.0

[[profile]]
name = "ablated"
base = "$TARGET"
description = "The forget-minus-retain direction of block 20 ablated"

[[profile.patch]]
file = "$ABL/ablate.gguf"
scale = 1.0
EOF
"$LETHE" profile check "$PROFILE"

# ---- evaluation -------------------------------------------------------------------------
EVAL=(--tofu forget01 --reference "$REFERENCE" --max-tokens "$MAX_TOKENS" -t "$THREADS")
[[ -n $LIMIT ]] && EVAL+=(--limit "$LIMIT")
E=$WORK/eval
log "eval: target and ULD"
stage "eval target + uld" "$LETHE" eval --profile "$PROFILE" --use uld "${EVAL[@]}" \
  --json "$E/uld.json" --html "$E/uld.html"
for p in slug ablated; do
  log "eval: $p"
  stage "eval $p" "$LETHE" eval --profile "$PROFILE" --use "$p" --no-base "${EVAL[@]}" \
    --json "$E/$p.json" --html "$E/$p.html"
done
log "eval: reference"
stage "eval reference" "$LETHE" eval -m "$REFERENCE" "${EVAL[@]}" \
  --json "$E/reference.json" --html "$E/reference.html"

log "summary"
python3 - "$E" "$TIMES" <<'EOF2'
import json, sys
e, times = sys.argv[1], sys.argv[2]
def side(path, i):
    return json.load(open(f"{e}/{path}"))["sides"][i]
rows = [("target", side("uld.json", 0)), ("reference", side("reference.json", 0)),
        ("ULD", side("uld.json", 1)), ("SLUG", side("slug.json", 0)),
        ("ablation", side("ablated.json", 0))]
def s(d, kind, key):
    for x in d["sets"]:
        if x["kind"] == kind:
            return x["summary"][key]
    return float("nan")
def f(x):
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
for name, secs in last.items():
    print(f"| {name} | {secs} |")
EOF2
echo "reports: $E/uld.html (target and ULD), $E/slug.html, $E/ablated.html, $E/reference.html"
