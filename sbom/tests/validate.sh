#!/usr/bin/env bash
# Validates SPDX JSON documents with the reference tools: spdx-tools' `pyspdxtools -i` (the
# SPDX 2.3 model and its validation) and `ntia-checker` (NTIA minimum elements).
#   sbom/tests/validate.sh DOC.spdx.json...
# The tools live in a venv made once ($OSSB_SBOM_VENV, default .testenv/venv-attest beside the
# workspace) from PyPI. Exit 3 when they cannot be installed, so a caller can tell "no tools"
# from "invalid document". ntia-checker's JSON report is left in DOC.ntia.json.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${OSSB_SBOM_VENV:-$here/../../.testenv/venv-attest}
if ! [[ -x $venv/bin/pyspdxtools && -x $venv/bin/ntia-checker ]]; then
  mkdir -p "$(dirname "$venv")"
  { python3 -m venv "$venv" &&
    "$venv/bin/pip" install -q --disable-pip-version-check 'spdx-tools>=0.8,<0.9' 'ntia-conformance-checker>=6,<7'; } >&2 ||
    { echo "validate.sh: cannot install spdx-tools and ntia-conformance-checker into $venv" >&2; exit 3; }
fi
for doc in "$@"; do
  echo "== pyspdxtools -i $doc"
  "$venv/bin/pyspdxtools" -i "$doc"
  echo "valid (pyspdxtools prints nothing for a valid document)"
  echo "== ntia-checker -c ntia $doc"
  # The report as JSON beside the document, for tests that look at which components failed.
  "$venv/bin/ntia-checker" -c ntia -r json -o "$doc.ntia.json" "$doc" >/dev/null || true
  "$venv/bin/ntia-checker" -c ntia "$doc"
done
