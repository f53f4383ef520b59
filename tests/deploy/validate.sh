#!/usr/bin/env bash
# Renders every kustomization under deploy/ (tests/deploy/render.py; compared with `kubectl
# kustomize` / `kustomize build` where one is installed) and validates each object with
# `kubernetes-validate --strict` for the oldest and newest Kubernetes versions docs/kubernetes.md
# claims, and each object that makes pods against the Pod Security Standard level it states
# (tests/deploy/pod_security.py: its annotation ossb.dev/pod-security; no Unconfined seccomp or
# AppArmor, no Unmasked /proc, capabilities within the baseline set, no privileged container or
# hostPath under baseline). Objects of CRDs that kubernetes-validate has no schema for
# (cert-manager's) are listed as skipped. Prints `N passed, N failed, N skipped` last.
#
#   tests/deploy/validate.sh [PYTHON]    PYTHON: one with PyYAML and kubernetes-validate
#                                        (default: .testenv/venv/bin/python, made by testenv.sh)
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
py=${1:-$repo/.testenv/venv/bin/python}
VERSIONS=(1.30.0 1.37.0)
[[ -x $py ]] || { echo "error: $py missing: run scripts/testenv.sh start" >&2; exit 1; }
kv=$(dirname "$py")/kubernetes-validate
[[ -x $kv ]] || { echo "error: kubernetes-validate is not installed beside $py" >&2; exit 1; }
cd "$repo"
mapfile -t dirs < <(find deploy -name kustomization.yaml -printf '%h\n' | sort)
passed=0 failed=0 skipped=0
"$py" tests/deploy/render.py --compare "${dirs[@]}" || { echo "FAILED: render.py differs from kustomize"; failed=$((failed + 1)); }
"$py" tests/deploy/pod_security.py --self-test || { echo "FAILED: pod_security.py's self-test"; failed=$((failed + 1)); }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for d in "${dirs[@]}"; do
  name=${d//\//_}
  "$py" - "$d" "$out/$name" <<'PY' || { echo "FAILED: rendering $d"; failed=$((failed + 1)); continue; }
import json, os, subprocess, sys, yaml
d, dest = sys.argv[1], sys.argv[2]
docs = json.loads(subprocess.run([sys.executable, "tests/deploy/render.py", d], check=True, capture_output=True, text=True).stdout)
os.makedirs(dest)
for i, doc in enumerate(docs):
    crd = "." in doc["apiVersion"].split("/")[0] and not doc["apiVersion"].split("/")[0].endswith("k8s.io")
    fn = f"{i:02d}-{doc['kind']}-{doc['metadata']['name']}{'.crd' if crd else ''}.yaml"
    with open(os.path.join(dest, fn), "w") as f:
        yaml.safe_dump(doc, f)
PY
  if res=$("$py" tests/deploy/pod_security.py "$out/$name"/*.yaml 2>&1); then
    echo "$res" | sed "s@$out/$name/@$d: @"
    passed=$((passed + 1))
  else
    echo "$res" | sed "s@$out/$name/@$d: @"
    failed=$((failed + 1))
  fi
  for f in "$out/$name"/*.yaml; do
    if [[ $f == *.crd.yaml ]]; then
      echo "skipped $d $(basename "$f") (a custom resource: no schema in kubernetes-validate)"
      skipped=$((skipped + 1))
      continue
    fi
    for v in "${VERSIONS[@]}"; do
      if res=$("$kv" --strict --no-warn --quiet -k "$v" "$f" 2>&1); then
        passed=$((passed + 1))
      else
        echo "FAILED: $d $(basename "$f") for Kubernetes $v:"
        echo "$res" | sed 's/^/  /'
        failed=$((failed + 1))
      fi
    done
  done
done
echo "kubernetes-validate --strict, Kubernetes ${VERSIONS[*]}, and the Pod Security levels stated, ${#dirs[@]} kustomizations:"
echo "$passed passed, $failed failed, $skipped skipped"
((failed == 0))
