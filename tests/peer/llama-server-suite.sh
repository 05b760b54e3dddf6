#!/usr/bin/env bash
# Run llama.cpp's own server test suite (tools/server/tests, pytest) against a server binary.
#
#   peer_server_suite.sh SERVER_BINARY [pytest args]
#
# SERVER_BINARY: llama-server, or lethe (any file named lethe*: it is started as `lethe serve ...`
# through a wrapper). Unless the pytest args name a test file (unit/...), the core-API files
# listed in DEFAULT_FILES are run.
#
# The vendored suite is never touched: it is copied to $PSUITE_DIR/llama.cpp/tools/server/tests
# ($PSUITE_DIR/tests links there; ../../../models and ../../../tools/mtmd, which some tests
# read, link to the vendored tree) and peer_server_suite.patch is applied to the copy. The patch
# only makes the suite offline: every ServerPreset serves the local model $PSUITE_MODEL (-m)
# instead of its Hugging Face model, ServerPreset.load_all() downloads nothing, and
# download_file() takes files from PSUITE_LOCAL_FILES (the LoRA of test_lora.py: a lethe-written
# random LoRA for SmolLM2). Tests that name another HF model themselves still try to download it
# and fail on both servers.
#
# Environment:
#   PSUITE_DIR            work folder (default $TMPDIR/lethe-psuite): copy, venv, logs
#   PEER_LLAMA_CPP        llama.cpp sources (default: the llama-cpp-python 0.3.36 sdist, fetched with pip into ~/.cache/lethe/peer)
#   PSUITE_MODEL          model of every preset (default SmolLM2-135M-Instruct Q4_1 in ~/.cache/lethe)
#   LETHE_BIN             lethe, to write the LoRA stand-in (default: lethe on PATH, else ./target/release/lethe)
#   PORT                  server port, 127.0.0.1 (default 18180)
#   PSUITE_TEST_TIMEOUT   per-test timeout in seconds (default 300)
#   PSUITE_TOTAL_TIMEOUT  whole-run timeout in seconds (default 7200)
#   LETHE_DROP_FLAGS      lethe only, off by default: flags the wrapper removes before `lethe serve`,
#                         as FLAG:NARGS words; "default" means "--offline:0 --batch-size:1
#                         --ubatch-size:1" (what every preset passes and lethe refuses; none
#                         changes an answer). Unset: lethe gets exactly what the suite passes.
#   PSUITE_LOG            where the run's output is copied (default $PSUITE_DIR/last-run.log)
#   PSUITE_ALLOW_IPV6=1   keep test_basic.py::test_server_multiple_addresses (it binds ::1 and is
#                         deselected by default: this runner stays on 127.0.0.1)
#
# Example (from the project root, after cargo build --release):
#   tests/peer/llama-server-suite.sh target/release/lethe -rA
#   tests/peer/llama-server-suite.sh target/release/lethe -rA unit/test_basic.py
set -euo pipefail

[ $# -ge 1 ] || { sed -n '2,6p' "$0"; exit 2; }
BIN=$(readlink -f "$1"); shift
[ -x "$BIN" ] || { echo "not an executable: $BIN"; exit 2; }

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
PATCH="$HERE/llama-server-suite.patch"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/lethe/peer
if [ -z "${PEER_LLAMA_CPP:-}" ]; then
  # llama.cpp's sources as vendored in the PyPI sdist of llama-cpp-python 0.3.36
  if [ ! -d "$CACHE/llama_cpp_python-0.3.36/vendor/llama.cpp" ]; then
    mkdir -p "$CACHE"
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d "$CACHE"
    tar xzf "$CACHE/llama_cpp_python-0.3.36.tar.gz" -C "$CACHE"
  fi
  PEER_LLAMA_CPP="$CACHE/llama_cpp_python-0.3.36/vendor/llama.cpp"
fi
VENDOR=$PEER_LLAMA_CPP
W=${PSUITE_DIR:-${TMPDIR:-/tmp}/lethe-psuite}
export PSUITE_MODEL=${PSUITE_MODEL:-$HOME/.cache/lethe/models/SmolLM2-135M-Instruct.Q4_1.gguf}
LETHE_BIN=${LETHE_BIN:-$(command -v lethe || echo ./target/release/lethe)}
export PORT=${PORT:-18180}
DEFAULT_FILES=(unit/test_basic.py unit/test_chat_completion.py unit/test_completion.py
  unit/test_tokenize.py unit/test_stream.py unit/test_security.py unit/test_lora.py
  unit/test_metrics.py unit/test_ctx_shift.py unit/test_ignore_eos.py unit/test_template.py
  unit/test_slot_save.py unit/test_infill.py unit/test_embedding.py)

[ -d "$VENDOR/tools/server/tests" ] || { echo "no suite at $VENDOR/tools/server/tests"; exit 2; }
[ -f "$PSUITE_MODEL" ] || { echo "no model at $PSUITE_MODEL"; exit 2; }
mkdir -p "$W"

# 1. a fresh adapted copy, in a llama.cpp-shaped tree so the suite's relative paths resolve
T="$W/llama.cpp"
rm -rf "$T"
mkdir -p "$T/tools/server"
cp -r "$VENDOR/tools/server/tests" "$T/tools/server/tests"
rm -rf "$T/tools/server/tests/tmp" "$T/tools/server/tests/__pycache__" "$T/tools/server/tests/unit/__pycache__"
ln -s "$VENDOR/models" "$T/models"
ln -s "$VENDOR/tools/mtmd" "$T/tools/mtmd"
(cd "$T" && patch -s -p1 < "$PATCH")
ln -sfn "$T/tools/server/tests" "$W/tests"

# 2. the suite's requirements (PyPI), plus pytest-timeout to bound each test
if [ ! -x "$W/venv/bin/pytest" ] || ! "$W/venv/bin/python" -c "import pytest_timeout" 2>/dev/null; then
  python3 -m venv "$W/venv"
  "$W/venv/bin/pip" install -q -r "$T/tools/server/tests/requirements.txt" pytest-timeout
fi

# 3. local stand-ins for downloaded files: test_lora.py's LoRA
LORA="$W/r8.gguf"
if [ ! -f "$LORA" ]; then
  [ -x "$LETHE_BIN" ] || { echo "no LoRA at $LORA and no lethe at $LETHE_BIN to write one"; exit 2; }
  "$LETHE_BIN" patch random -m "$PSUITE_MODEL" --rank 8 --blocks 0..4 -o "$LORA"
fi
export PSUITE_LOCAL_FILES="moe_shakespeare15M.gguf=$LORA"

# 4. the server command: the harness runs [LLAMA_SERVER_BIN_PATH, args...]
SERVER="$BIN"
case "$(basename "$BIN")" in
  lethe*)
    mkdir -p "$W/bin"
    SERVER="$W/bin/lethe-server"
    cat > "$SERVER" <<EOF
#!/usr/bin/env bash
# llama-server's command line -> lethe serve. Strict unless LETHE_DROP_FLAGS is set.
drop=\${LETHE_DROP_FLAGS:-}
[ "\$drop" = default ] && drop="--offline:0 --batch-size:1 --ubatch-size:1"
[ -z "\$drop" ] && exec "$BIN" serve "\$@"
args=()
while [ \$# -gt 0 ]; do
  n=-1
  for d in \$drop; do [ "\$1" = "\${d%%:*}" ] && n=\${d##*:}; done
  if [ "\$n" -ge 0 ]; then shift; shift "\$n"; else args+=("\$1"); shift; fi
done
exec "$BIN" serve "\${args[@]}"
EOF
    chmod +x "$SERVER" ;;
esac
export LLAMA_SERVER_BIN_PATH="$SERVER"

# 5. run: one process, no -x, each test bounded
has_path=0
for a in "$@"; do case "$a" in unit/*|*.py|*.py::*) has_path=1 ;; esac; done
[ "$has_path" = 1 ] || set -- "$@" "${DEFAULT_FILES[@]}"
EXTRA=()
[ "${PSUITE_ALLOW_IPV6:-0}" = 1 ] || EXTRA+=(--deselect unit/test_basic.py::test_server_multiple_addresses)
LOG=${PSUITE_LOG:-$W/last-run.log}
echo "suite: $T/tools/server/tests  server: $SERVER  model: $PSUITE_MODEL  port: $PORT"
cd "$T/tools/server/tests"
set +e
timeout -k 30 "${PSUITE_TOTAL_TIMEOUT:-7200}" "$W/venv/bin/python" -m pytest -p no:cacheprovider \
  --timeout="${PSUITE_TEST_TIMEOUT:-300}" "${EXTRA[@]}" "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e

# 6. servers a killed run left behind: by the pids the harness printed, only if still ours
for pid in $(grep -oE 'server pid=[0-9]+' "$LOG" | cut -d= -f2 | sort -u); do
  if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "--port $PORT"; then
    echo "stopping leftover server pid=$pid"; kill "$pid" 2>/dev/null || true
  fi
done
exit "$rc"
