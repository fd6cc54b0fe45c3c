#!/usr/bin/env bash
# A test of the tests: seed three deliberate bugs, one at a time, into a temporary copy of the
# repository and show that the relevant tests fail on each (and pass on the unchanged copy).
#
#   order  masks published in the wrong prompt order (the node pairs prompt i with mask K-1-i)
#   drop   a frame dropped without being counted (every 4th frame vanishes before the books)
#   text   a text encode on the frame path (the node runs the text encoder on every frame)
#
# The copy holds the tracked files as they are in the working tree (uncommitted edits
# included) and ../shared by a link; .venv is this checkout's. Exit 0 only when the baseline
# passes and every seeded bug is caught. About 3-5 minutes on 2 cores.
#
#   bash scripts/mutation_check.sh [order|drop|text ...]    (MUTATION_KEEP=1 keeps the logs)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"
[ -x "$py" ] || { echo "[mutation] no .venv: run scripts/setup.sh first" >&2; exit 2; }
mutations=("$@")
[ "${#mutations[@]}" -gt 0 ] || mutations=(order drop text)
# The tests that make the claims the bugs break (tests/test_node.py): per-prompt masks against the
# offline predictor; the source's count against the node's; the text encoder probed at itself.
tests=(
  "tests/test_node.py::test_node_runs_on_each_cpu_engine_with_the_same_masks[torch]"
  "tests/test_node.py::test_video_file_in_masks_out"
  "tests/test_node.py::test_prompts_change_mid_stream_and_text_is_never_encoded_on_the_frame_path"
)

tmp="$(mktemp -d "${TMPDIR:-/tmp}/fsam-mutation-XXXXXX")"
if [ "${MUTATION_KEEP:-0}" = "1" ]; then  # keep the copy and the pytest logs for a look
  trap 'echo "[mutation] logs kept in $tmp"' EXIT
else
  trap 'rm -rf "$tmp"' EXIT
fi

# Seeds one bug into the copy's fluorosam_rt/service/node.py; fails loudly if the code it targets moved.
seed() {
  "$py" - "$tmp/repo/fluorosam_rt/service/node.py" "$1" <<'PY'
import sys

path, which = sys.argv[1], sys.argv[2]
with open(path) as f:
    src = f.read()
edits = {
    "order": [(
        "zip(done.prompts, done.scores, done.present, done.masks, done.geometry)",
        "zip(done.prompts, done.scores, done.present, done.masks[::-1], done.geometry)",
    )],
    "drop": [(
        "    def receive(self, frame: Frame) -> None:\n        frame.received_ns = time.time_ns()\n",
        "    def receive(self, frame: Frame) -> None:\n        frame.received_ns = time.time_ns()\n"
        "        if frame.frame_id % 4 == 3:  # SEEDED BUG: dropped, never counted\n            return\n",
    )],
    "text": [(
        "    def _infer(self, frame: Frame, t: dict[str, int]) -> Processed:\n"
        "        prompts = self.prompts.snapshot()\n",
        "    def _infer(self, frame: Frame, t: dict[str, int]) -> Processed:\n"
        "        prompts = self.prompts.snapshot()\n"
        "        if prompts:  # SEEDED BUG: text encoded on the frame path, around the prompt cache\n"
        "            self.predictor.text_encoder.encode([q.text for q in prompts])\n",
    )],
}
if which not in edits:
    sys.exit(f"unknown mutation {which!r}; choose from {sorted(edits)}")
for old, new in edits[which]:
    if src.count(old) != 1:
        sys.exit(f"cannot seed {which!r}: the code it changes is no longer in {path} exactly once:\n{old}")
    src = src.replace(old, new)
with open(path, "w") as f:
    f.write(src)
PY
}

fresh_copy() {
  rm -rf "$tmp/repo"
  mkdir -p "$tmp/repo"
  (cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$tmp/repo" 2>/dev/null || true)
  ln -sfn "$(cd "$root/.." && pwd)/shared" "$tmp/shared"
  # The copy's code must be what the tests import (not the editable install of this checkout).
  (cd "$tmp/repo" && PYTHONPATH="$tmp/repo" "$py" -c \
    "import fluorosam_rt.service.node as n, sys; sys.exit(0 if n.__file__.startswith('$tmp/repo/') else 'imports ' + n.__file__)")
}

run_tests() {  # prints the failed tests; returns pytest's code
  local log="$tmp/$1.log"
  set +e
  (cd "$tmp/repo" && PYTHONPATH="$tmp/repo" nice -n 10 "$py" -m pytest -q -p no:cacheprovider -rf \
    "${tests[@]}" >"$log" 2>&1)
  local rc=$?
  set -e
  grep -E '^FAILED' "$log" | sed 's/^/    /' || true
  return "$rc"
}

echo "[mutation] copy of $root in $tmp; tests: ${#tests[@]} from tests/test_node.py"
fresh_copy
t0=$SECONDS
if ! run_tests baseline; then
  echo "[mutation] baseline: the unchanged copy fails these tests, so nothing can be judged:" >&2
  tail -n 30 "$tmp/baseline.log" >&2
  exit 2
fi
echo "[mutation] baseline: all pass ($((SECONDS - t0)) s)"
missed=()
for m in "${mutations[@]}"; do
  fresh_copy
  seed "$m"
  t0=$SECONDS
  echo "[mutation] $m: seeded; running the tests"
  if run_tests "$m"; then
    echo "[mutation] $m: NOT CAUGHT: every test passed with the bug in ($((SECONDS - t0)) s)"
    missed+=("$m")
  else
    echo "[mutation] $m: caught by the failures above ($((SECONDS - t0)) s)"
  fi
done
if [ "${#missed[@]}" -gt 0 ]; then
  echo "[mutation] missed: ${missed[*]}" >&2
  exit 1
fi
echo "[mutation] all ${#mutations[@]} seeded bugs caught"
