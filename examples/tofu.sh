#!/usr/bin/env bash
# The TOFU story on SmolLM2, end to end, on the CPU:
#   1. target    = SmolLM2 fine-tuned on TOFU authors 1-20 (full.json rows 0-399) plus the
#                  forget01 authors (rows 3960-3999), baked into a GGUF;
#   2. reference = the same fine-tune without forget01 (what forgetting should look like);
#   3. ULD       = assistants that remember forget01 and know nothing elsewhere, subtracted from
#                  the target at decode time:
#        uld-v1   lethe's first assistant (8 blocks, the group balance), as the story first ran it
#                 (with V1=1 only: 21 minutes for a row the README keeps);
#        uld-k8   8 blocks with ULD's reference balance (a forget answer token weighs 9 retain
#                 positions), held-out rows picking the checkpoint;
#        uld-k16  16 blocks, the same recipe, 5 epochs (with K16=1 only: 32 minutes for a row
#                 the README keeps);
#      each new assistant's alpha and filter chosen by `lethe calibrate`: held-out training-side
#      rows of forget01 (an augmentation paraphrase against copies of it with one fact changed)
#      under the profile, against the same rows under the reference (no evaluation data);
#   4. SLUG      = one dense delta on the one matrix SLUG picks (with SLUG=1 only: 11 minutes
#                  for a row the README keeps);
#   5. ablation  = the forget-minus-retain direction removed from the residual stream;
#   6. patches trained to forget (`forge unlearn`): graddiff, NPO, SimNPO and RMU, each a LoRA
#      whose epoch is chosen by the calibration rule on the same held-out rows, each baked
#      into an F16-patched model as well (`patch bake`, its report saying how much of the delta the
#      requantisation kept);
#   7. `lethe eval` of everything on forget01 (JSON + HTML; the first assistant score-only, its
#      greedy answers being the same under either scoring rule), score-only sweeps of alpha and
#      filter for the chart, and one report with every side (`lethe report`).
#
# Usage: examples/tofu.sh            (from the repository root; builds lethe if needed)
# Environment: THREADS (2), WORK (~/.cache/lethe/tofu), TOFU_DATA (data/tofu), LETHE (the
# binary), EPOCHS (5), MAX_TOKENS (200), LIMIT (score only the first N items of each set),
# V1 (1: also train and re-score the first assistant), K16 (1: also the 16-block assistant),
# SLUG (1: also SLUG).
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
V1=${V1:-}
K16=${K16:-}
WITH_SLUG=${SLUG:-}
ULD_SIDES=(uld-k8)
[[ -n $K16 ]] && ULD_SIDES+=(uld-k16)
if [[ -z "${LETHE:-}" ]]; then
  cargo build --release --quiet
  LETHE=target/release/lethe
fi
mkdir -p "$WORK/cache" "$WORK/data" "$WORK/eval"
# Stage times, appended run after run (a stage reused from the cache keeps its last time).
TIMES="$WORK/times.tsv"
touch "$TIMES"
# The stages of this run, in order (those reused from the cache too).
RUN_STAGES="$WORK/run-stages.txt"
: >"$RUN_STAGES"

log() { printf '\n== %s\n' "$*"; }
# stage NAME CMD...: runs CMD, records its wall time.
stage() {
  local name=$1
  shift
  local t0 ms
  t0=$(date +%s%N)
  "$@"
  ms=$((($(date +%s%N) - t0) / 1000000))
  echo "$name" >>"$RUN_STAGES"
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
    echo "$name" >>"$RUN_STAGES"
  fi
  echo "$dir"
}

# ---- inputs -----------------------------------------------------------------------------
"$LETHE" fetch smollm2 >/dev/null
BASE=$("$LETHE" fetch --list | awk '$1 == "smollm2" { print $NF }')
log "base: $BASE"

# Slices of full.json (question/answer), the forget01 rows of the wrong-answer file, and the
# calibration rows.
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
write("unlearn_retain.json", full[300:380])
write("forget01_wrong_answers.json", wrong01)
# Calibration rows, never trained on and never TOFU's evaluation answers, built the way TOFU
# builds its perturbed answers (one paraphrase, copies of it with a fact changed): the word
# spans (at most 6 words) that turn a training answer into one of its augmentation wrong
# answers are replaced in an augmentation paraphrase of the answer, where they appear in it.
# Per question the first paraphrase of forget10_paraphrases.json (forge uld trains on
# forget01_paraphrases.json) that takes at least one change; questions none takes are left out.
# Forget side: forget01 (authors 199-200). Unseen side: authors 181-198 (forget10 without
# forget01), whom the target never saw (the yardstick without a stand-in model). Retain side:
# the last 20 ULD retain rows (authors 16-20; forge uld holds them out with --hold-out-retain).
import difflib, re
def norm(ws):
    return [re.sub(r"[^\w+-]", "", x).lower() for x in ws]
def perturb(answer, text, wrong_text):
    a, b, c = answer.split(), wrong_text.split(), text.split()
    sm = difflib.SequenceMatcher(a=norm(a), b=norm(b), autojunk=False)
    if sm.ratio() < 0.5:
        return None
    cn, res, n = norm(c), list(c), 0
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag != "replace" or i2 - i1 > 6:
            continue
        s = norm(a[i1:i2])
        for k in range(len(cn) - len(s) + 1):
            if cn[k:k + len(s)] == s and all(x is not None for x in res[k:k + len(s)]):
                tail = re.search(r"[^\w\"')]*$", c[k + len(s) - 1]).group(0)
                rep = b[j1:j2]
                rep[-1] = re.sub(r"[.,;:!?]+$", "", rep[-1]) + tail
                res[k:k + len(s)] = [" ".join(rep)] + [None] * (len(s) - 1)
                n += 1
                break
    return " ".join(x for x in res if x is not None) if n else None
def cal(rows):
    got = []
    for r in rows:
        q = r["question"]
        for t in para[q]["paraphrased_answers"]:
            ws = []
            for w in wrong[q]["wrong_answers"]:
                x = perturb(r["answer"], t, w)
                if x and x != t and x not in ws:
                    ws.append(x)
            if ws:
                got.append({"question": q, "answer": t, "wrong_answers": ws})
                break
    return got
cal_forget, cal_unseen = cal(forget), cal(full[3600:3960])
write("cal_forget.json", cal_forget)
write("cal_unseen.json", cal_unseen)
write("cal_retain.json", [{"question": r["question"], "answer": r["answer"]} for r in full[380:400]])
print("data: target 440 rows, reference 400, forget01 40, ULD retain 100, wrong answers 40x3, "
      f"calibration {len(cal_forget)} forget + {len(cal_unseen)} unseen + 20 retain rows")
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
    printf 'finetune %s\nbake %s\n' "$name" "$name" >>"$RUN_STAGES"
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
# lethe's first assistant: the recipe the story first ran (V1=1).
V1_ARGS=(--preset lethe-v1 --layers 8 --rank 32 --lora-alpha 32 --epochs 5 --lr 1e-3
  --retain-weight 5 --paraphrases-per-row 5 --batch 4 --seed 0)
if [[ -n $V1 ]]; then
  ULD_V1=$(cached uld-v1 "${AUG_FILES[@]}" -- "$LETHE" forge uld -m "$TARGET" "${AUG[@]}" \
    "${V1_ARGS[@]}" -t "$THREADS" -o "{}/assistant.gguf")
fi
# ULD's reference balance and LoRA (the preset), 8 blocks; one paraphrase and one wrong answer
# per forget row and the last 20 retain rows held out to pick the checkpoint.
K8_ARGS=(--preset reference --layers 8 --hold-out-retain 20 --batch 4 --seed 0)
ULD_K8=$(cached uld-k8 "${AUG_FILES[@]}" -- "$LETHE" forge uld -m "$TARGET" "${AUG[@]}" \
  "${K8_ARGS[@]}" -t "$THREADS" -o "{}/assistant.gguf")
# Twice the depth: the first 16 blocks, the same recipe for 5 epochs.
K16_ARGS=(--preset reference --layers 16 --epochs 5 --hold-out-retain 20 --batch 4 --seed 0)
if [[ -n $K16 ]]; then
  ULD_K16=$(cached uld-k16 "${AUG_FILES[@]}" -- "$LETHE" forge uld -m "$TARGET" "${AUG[@]}" \
    "${K16_ARGS[@]}" -t "$THREADS" -o "{}/assistant.gguf")
fi

if [[ -n $WITH_SLUG ]]; then
  SLUG=$(cached slug "$TARGET" "$D/forget01.json" "$D/uld_retain.json" -- "$LETHE" forge slug \
    -m "$TARGET" --forget "$D/forget01.json" --retain "$D/uld_retain.json" --max 20 \
    --candidates 3 --steps 8 -t "$THREADS" -o "{}/slug.gguf")
fi
ABL=$(cached ablate "$TARGET" "$D/forget01.json" "$D/uld_retain.json" -- "$LETHE" forge ablate \
  -m "$TARGET" --forget "$D/forget01.json" --retain "$D/uld_retain.json" --layer 20 \
  --field answer -t "$THREADS" -o "{}/ablate.gguf")

# Patches trained to forget, each at its paper's loss settings (NPO beta 0.1; SimNPO beta 4.5,
# gamma 0; graddiff, NPO and SimNPO with retain weight 1; RMU at block 7 with c = 5 x the
# frozen states' norm and WMDP's retain weight 1200, its LoRA on blocks 5-7) and one recipe:
# LoRA rank 16 on every matrix, 3 epochs (RMU: 6) of batches of 4 forget and 4 retain rows;
# the forget side is forget01 plus 2 augmentation paraphrases per row (none whose answer is a
# calibration row), the retain side rows 300-379. The epoch kept is the calibration rule's choice on the
# rows `lethe calibrate` reads for ULD (the reference as the stand-in; retain rows 380-399
# held out). The learning rates (and RMU's epochs) are the rule's choice among the runs the
# README lists.
UL_METHODS=(graddiff npo simnpo rmu)
declare -A UL_LR=([graddiff]=1e-4 [npo]=1e-4 [simnpo]=3e-4 [rmu]=5e-4)
UL_FILES=("$TARGET" "$REFERENCE" "$D/forget01.json" "$DATA/augment/forget01_paraphrases.json"
  "$D/unlearn_retain.json" "$D/cal_forget.json" "$D/cal_retain.json")
UL_ARGS=(--forget "$D/forget01.json" --forget-paraphrases "$DATA/augment/forget01_paraphrases.json"
  --paraphrases-per-row 2 --retain "$D/unlearn_retain.json" --check-forget "$D/cal_forget.json"
  --check-retain "$D/cal_retain.json" --stand-in "$REFERENCE" --batch 4 --seed 0)
declare -A UL
for m in "${UL_METHODS[@]}"; do
  extra=(--lr "${UL_LR[$m]}" --epochs 3)
  [[ $m == rmu ]] && extra=(--lr "${UL_LR[$m]}" --epochs 6 --retain-weight 1200)
  UL[$m]=$(cached "unlearn-$m" "${UL_FILES[@]}" -- "$LETHE" forge unlearn --method "$m" \
    -m "$TARGET" "${UL_ARGS[@]}" "${extra[@]}" -t "$THREADS" -o "{}/$m.gguf")
  # Baked into the target (a model llama.cpp runs), the changed matrices in F16: an unlearning
  # delta is about 0.2% of a weight, below the Q8_0 step, and a Q8_0 bake drops most of it (its
  # report says so). The report goes to bake.txt.
  cached "bake-$m" "$TARGET" "${UL[$m]}/$m.gguf" -- bash -c "\"$LETHE\" patch bake -m \
    \"$TARGET\" --patch \"${UL[$m]}/$m.gguf\" --type f16 -t $THREADS -o {}/$m.baked.gguf \
    | tee {}/bake.txt" >/dev/null
done

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
  uld_profile uld-k8 "$ULD_K8" 0.75 0.01
  [[ -n $K16 ]] && uld_profile uld-k16 "$ULD_K16" 0.75 0.01
} >"$PROFILE"
# The rule (lethe calibrate): the point whose truth ratios on the held-out forget rows match the
# reference's on the same rows best (KS p), among the points that raise the held-out retain rows'
# NLL by at most 0.05 nats per token. For comparison, the choice without a stand-in model (the
# target on authors it never saw as the yardstick) is computed too; it is not used.
CAL_FILES=("$REFERENCE" "$D/cal_forget.json" "$D/cal_unseen.json" "$D/cal_retain.json")
declare -A CHOSEN
chosen() {
  python3 -c 'import json,sys
c = json.load(open(sys.argv[1]))["chosen_settings"]
t = c["terms"][0]
print("%g %g" % (-t["weight"], t["filter"]))' "$1"
}
for p in "${ULD_SIDES[@]}"; do
  dir=$(cached "calibrate-$p" "$PROFILE" "${CAL_FILES[@]}" -- "$LETHE" calibrate \
    --profile "$PROFILE" --use "$p" "${SWEEP[@]}" --forget "$D/cal_forget.json" \
    --stand-in "$REFERENCE" --retain "$D/cal_retain.json" -t "$THREADS" \
    --json "{}/calibration.json")
  CHOSEN[$p]=$(chosen "$dir/calibration.json")
  echo "$p: alpha and filter chosen: ${CHOSEN[$p]}"
  dir=$(cached "calibrate-unseen-$p" "$PROFILE" "${CAL_FILES[@]}" -- "$LETHE" calibrate \
    --profile "$PROFILE" --use "$p" "${SWEEP[@]}" --forget "$D/cal_forget.json" \
    --unseen "$D/cal_unseen.json" --retain "$D/cal_retain.json" -t "$THREADS" \
    --json "{}/calibration.json")
  echo "$p: without a stand-in (unseen authors' rows under the target) the rule would choose" \
    "$(chosen "$dir/calibration.json")"
done

# The profiles evaluated: the old assistant as it ran, the new ones at their calibrated points,
# SLUG and ablation.
{
  [[ -n $V1 ]] && uld_profile uld-v1 "$ULD_V1" 0.75 0.01
  read -r a f <<<"${CHOSEN[uld-k8]}"
  uld_profile uld-k8 "$ULD_K8" "$a" "$f"
  if [[ -n $K16 ]]; then
    read -r a f <<<"${CHOSEN[uld-k16]}"
    uld_profile uld-k16 "$ULD_K16" "$a" "$f"
  fi
  for m in "${UL_METHODS[@]}"; do
    printf '[[profile]]\nname = "%s"\nbase = "%s"\n\n[[profile.patch]]\nfile = "%s"\n\n' \
      "$m" "$TARGET" "${UL[$m]}/$m.gguf"
  done
  [[ -n $WITH_SLUG ]] && printf '[[profile]]\nname = "slug"\nbase = "%s"\n\n[[profile.patch]]\nfile = "%s"\n\n' \
    "$TARGET" "$SLUG/slug.gguf"
  cat <<EOF
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
log "eval: target"
stage "eval target" "$LETHE" eval -m "$TARGET" "${EVAL[@]}" --json "$E/target.json" \
  --html "$E/target.html"
if [[ -n $V1 ]]; then
  log "eval: the first assistant re-scored with the mass rule (score-only)"
  stage "eval uld-v1" "$LETHE" eval --profile "$PROFILE" --use uld-v1 --no-base --score-only \
    "${EVAL[@]}" --json "$E/uld-v1.json"
fi
# Each new assistant: one pass scores every sweep point (for the chart) and answers greedily at
# the calibrated one (its full evaluation).
for p in "${ULD_SIDES[@]}"; do
  read -r a f <<<"${CHOSEN[$p]}"
  log "eval: $p, a sweep with greedy answers at the calibrated point (alpha $a, filter $f)"
  stage "eval $p" "$LETHE" eval --profile "$PROFILE" --use "$p" --no-base "${SWEEP[@]}" \
    --answer-at "alpha=$a,filter=$f" "${EVAL[@]}" --json "$E/sweep-$p.json" --html "$E/$p.html"
done
SLUG_SIDE=()
[[ -n $WITH_SLUG ]] && SLUG_SIDE=(slug)
for p in "${SLUG_SIDE[@]}" ablated "${UL_METHODS[@]}"; do
  log "eval: $p"
  stage "eval $p" "$LETHE" eval --profile "$PROFILE" --use "$p" --no-base "${EVAL[@]}" \
    --json "$E/$p.json" --html "$E/$p.html"
done
log "eval: reference"
stage "eval reference" "$LETHE" eval -m "$REFERENCE" "${EVAL[@]}" \
  --json "$E/reference.json" --html "$E/reference.html"

log "report"
V1_JSON=()
[[ -n $V1 ]] && V1_JSON=("$E/uld-v1.json")
SWEEPS=()
for p in "${ULD_SIDES[@]}"; do SWEEPS+=("$E/sweep-$p.json"); done
UL_JSON=()
for m in "${UL_METHODS[@]}"; do UL_JSON+=("$E/$m.json"); done
SLUG_JSON=()
[[ -n $WITH_SLUG ]] && SLUG_JSON=("$E/slug.json")
"$LETHE" report "$E/target.json" "${V1_JSON[@]}" "${SWEEPS[@]}" "${SLUG_JSON[@]}" \
  "$E/ablated.json" "${UL_JSON[@]}" "$E/reference.json" --html "$E/story.html" \
  --json "$E/story.json"

log "summary"
python3 - "$E" "$TIMES" "$V1" "$RUN_STAGES" "$K16" "$WITH_SLUG" <<'EOF2'
import json, sys
e, times, v1, run, k16, slug = sys.argv[1:7]
def side(path, i):
    return json.load(open(f"{e}/{path}"))["sides"][i]
def best(path):
    # The sweep point of highest forget quality (ties: higher scored utility). This choice reads
    # the evaluation, so it is not a method's result: it shows what the calibrated choice leaves.
    sides = json.load(open(f"{e}/{path}"))["sides"]
    return max((x for x in sides if x.get("forget_quality") is not None),
               key=lambda x: (x["forget_quality"], x.get("scored_utility") or 0))
rows = [("target", side("target.json", 0)), ("reference", side("reference.json", 0))]
if v1:
    rows.append(("ULD v1 (mass rule, score-only)", side("uld-v1.json", 0)))
def answered(path):
    # The sweep's point answered greedily: the calibrated one.
    return next(x for x in json.load(open(f"{e}/{path}"))["sides"]
                if x.get("model_utility") is not None)
rows += [("ULD K=8", answered("sweep-uld-k8.json"))]
if k16:
    rows += [("ULD K=16", answered("sweep-uld-k16.json"))]
rows += [("ULD K=8, sweep's best (reads the evaluation; score-only)", best("sweep-uld-k8.json"))]
if k16:
    rows += [("ULD K=16, sweep's best (reads the evaluation; score-only)",
              best("sweep-uld-k16.json"))]
if slug:
    rows += [("SLUG", side("slug.json", 0))]
rows += [("ablation", side("ablated.json", 0))]
rows += [(f"{m} (LoRA patch)", side(f"{m}.json", 0)) for m in ("graddiff", "npo", "simnpo", "rmu")]
def s(d, kind, key):
    for x in d["sets"]:
        if x["kind"] == kind:
            if key == "rouge" and any(i.get("generated") is None for i in x["items"]):
                return None  # scored only: no greedy answers
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
    mu = d["model_utility"]
    mu = f(mu) if mu is not None else f"({f(d['scored_utility'])} scored)"
    cells = [d["forget_quality"], s(d, "Forget", "rouge"),
             s(d, "Forget", "probability"), s(d, "Forget", "truth_ratio"),
             s(d, "Retain", "rouge"), s(d, "Retain", "probability"), d["mia"]["loss"]]
    cells = [f(c) for c in cells]
    cells.insert(1, mu)
    print(f"| {name} | " + " | ".join(cells) + f" | {d['seconds']:.0f} |")
print()
print("| stage | seconds |")
print("|---|---|")
# The stages of this run, each with its last recorded time (a stage reused from the cache
# keeps the time of the run that made it).
last = {}
for line in open(times):
    name, secs = line.rstrip("\n").split("\t")
    last[name] = float(secs)
total = 0.0
for name in dict.fromkeys(l.strip() for l in open(run) if l.strip()):
    secs = last.get(name)
    print(f"| {name} | {'-' if secs is None else f'{secs:.1f}'} |")
    total += secs or 0.0
print(f"| all | {total:.0f} |")
EOF2
echo "reports: $E/story.html (every side, the forget-quality charts), $E/target.html, $E/uld-k8.html, $E/ablated.html, $E/{graddiff,npo,simnpo,rmu}.html, $E/reference.html"
