#!/usr/bin/env bash
# Gate a candidate step and, only if it passes, add it as a new version to a live Triton
# model repository (then ask Triton, in EXPLICIT model-control mode, to load it).
#
# usage: rollout.sh STORE STEP REPO
#   env: CISS (default: ciss), GATE_ARGS (extra 'ciss check' options),
#        TRITON_URL (e.g. http://localhost:8000; unset = only update the repository)
set -euo pipefail
store=$1 step=$2 repo=$3
ciss=${CISS:-ciss}
version=$((step + 1))   # Triton versions start at 1: version = step + 1

# 1. The retention gate on the engine Triton will run. Exit 1 = an old class regressed.
# shellcheck disable=SC2086
if ! $ciss check --store "$store" --step "$step" --engine onnx --json ${GATE_ARGS:-} \
        > "gate-step$step.json"; then
    echo "step $step refused by the retention gate (see gate-step$step.json); not rolled out"
    exit 1
fi

# 2. Export into a fresh folder, then move the new version into the live repository with a
#    rename: Triton must never see a half-copied version folder.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$ciss export --store "$store" --step "$step" --format triton --out "$tmp/repo"
mkdir -p "$repo/ciss_onnx"
cp "$tmp/repo/ciss_onnx/config.pbtxt" "$repo/ciss_onnx/.config.pbtxt.tmp"
mv "$repo/ciss_onnx/.config.pbtxt.tmp" "$repo/ciss_onnx/config.pbtxt"
cp -r "$tmp/repo/ciss_onnx/$version" "$repo/ciss_onnx/.$version.tmp"   # ignored by Triton
mv "$repo/ciss_onnx/.$version.tmp" "$repo/ciss_onnx/$version"

# 3. Load it. Triton keeps serving the old version if the load fails; with
#    version_policy latest {num_versions: 1} the new version replaces it once loaded.
if [ -n "${TRITON_URL:-}" ]; then
    curl -sf -X POST "$TRITON_URL/v2/repository/models/ciss_onnx/load"
    curl -sf "$TRITON_URL/v2/models/ciss_onnx/versions/$version/ready"
fi
echo "step $step is version $version of ciss_onnx in $repo"
