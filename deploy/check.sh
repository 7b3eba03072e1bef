#!/usr/bin/env bash
# Offline checks of the deployment files, run by .ci/run before the Rust tests:
# - every Kubernetes manifest against the pinned Kubernetes version's schemas, strictly (unknown
#   fields are errors), with kubernetes-validate's bundled schemas (no network);
# - every shell script of the repository with shellcheck;
# - the compose file and the Grafana dashboard parse, and every metric the dashboard queries is
#   one the coordinator exports (coordinator/src/metrics.rs).
# Needs: kubernetes-validate (PyPI), shellcheck (Debian), python3 with PyYAML (a dependency of
# kubernetes-validate).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.33.0
fail=0

echo "== kubernetes-validate (Kubernetes $K8S_VERSION, strict)"
manifests=()
for f in deploy/k8s/*.yaml; do
    # The kustomization is kubectl's build file, not an API object.
    [[ $(basename "$f") == kustomization.yaml ]] && continue
    manifests+=("$f")
done
kubernetes-validate --strict --quiet -k "$K8S_VERSION" "${manifests[@]}" || fail=1
echo "${#manifests[@]} manifest file(s) checked"
# Every manifest is listed in the kustomization, so `kubectl apply -k deploy/k8s` deploys them all.
for f in "${manifests[@]}"; do
    grep -qx "  - $(basename "$f")" deploy/k8s/kustomization.yaml || { echo "$f is not in deploy/k8s/kustomization.yaml" >&2; fail=1; }
done

echo "== shellcheck"
# Tracked files and new ones not ignored, so a script is checked before its first commit.
mapfile -t scripts < <(git ls-files --cached --others --exclude-standard '*.sh' '*.sbatch' '.ci/run' | sort -u)
shellcheck "${scripts[@]}" || fail=1
echo "${#scripts[@]} script(s) checked: ${scripts[*]}"

echo "== compose file and Grafana dashboard"
python3 - <<'PY' || fail=1
import json, re, sys, yaml

compose = yaml.safe_load(open("deploy/docker-compose.yml"))
for svc in ("coordinator", "worker"):
    assert svc in compose["services"], f"docker-compose.yml: service {svc} missing"
dash = json.load(open("deploy/grafana/liandan.json"))
exported = set(re.findall(r'"(liandan_[a-z_]+)"', open("coordinator/src/metrics.rs").read()))
used = set()
for p in dash["panels"]:
    for t in p.get("targets", []):
        used |= set(re.findall(r"liandan_[a-z_]+", t["expr"]))
base = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
missing = sorted(m for m in base if m not in exported)
if missing:
    sys.exit(f"deploy/grafana/liandan.json queries metrics the coordinator does not export: {missing}")
print(f"dashboard: {len(dash['panels'])} panels, {len(base)} metrics, all exported")
PY

if [[ $fail -ne 0 ]]; then
    echo "deploy/check.sh: FAILED" >&2
    exit 1
fi
echo "deploy/check.sh: all deployment checks passed"
