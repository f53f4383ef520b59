"""Validates in-toto statements with the in-toto-attestation package (the in-toto project's
statement and SLSA v1 provenance models). Usage: validate.py FILE...; exits non-zero on the
first invalid file. What is checked, per file:
  - the whole statement parses strictly into the Statement protobuf (no unknown or misspelt
    top-level field) and passes Statement.validate() (type, subjects with digests,
    predicateType, predicate);
  - SLSA v1 predicates parse strictly into the Provenance protobuf once BuildKit's own
    `buildkit_*` run metadata extensions are set aside (they are not in the model), and have
    a build type, external parameters and RFC 3339 timestamps;
  - SLSA v0.2 predicates (the package has no model for them): the required fields of the
    v0.2 schema, by hand;
  - SPDX predicates: an SPDX 2.x document object.
"""

import json
import sys

from google.protobuf import json_format
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2


def check_slsa_v1(pred):
    pred = json.loads(json.dumps(pred))
    meta = pred.get("runDetails", {}).get("metadata", {})
    for key in [k for k in meta if k.startswith("buildkit_")]:
        del meta[key]
    pb = json_format.ParseDict(pred, provenance_pb2.Provenance())
    if not pb.build_definition.build_type:
        raise ValueError("buildDefinition.buildType missing")
    if not pb.build_definition.HasField("external_parameters"):
        raise ValueError("buildDefinition.externalParameters missing")
    if not pb.run_details.builder.id:
        raise ValueError("runDetails.builder.id missing")
    for rd in pb.build_definition.resolved_dependencies:
        if not (rd.uri and rd.digest):
            raise ValueError("resolvedDependency without uri or digest")


def check_slsa_v02(pred):
    if not isinstance(pred.get("builder", {}).get("id"), str):
        raise ValueError("builder.id missing")
    if not pred.get("buildType"):
        raise ValueError("buildType missing")
    inv = pred.get("invocation", {})
    for key in ("configSource", "parameters", "environment"):
        if key not in inv:
            raise ValueError("invocation." + key + " missing")
    for m in pred.get("materials", []):
        if not (m.get("uri") and m.get("digest")):
            raise ValueError("material without uri or digest")
    meta = pred.get("metadata", {})
    for key in ("parameters", "environment", "materials"):
        if not isinstance(meta.get("completeness", {}).get(key), bool):
            raise ValueError("metadata.completeness." + key + " missing")


def check_spdx(pred):
    if not str(pred.get("spdxVersion", "")).startswith("SPDX-2."):
        raise ValueError("not an SPDX 2 document")


def main(paths):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        pb = json_format.Parse(text, statement_pb2.Statement())
        Statement.copy_from_pb(pb).validate()
        doc = json.loads(text)
        kind = doc["predicateType"]
        if kind == "https://slsa.dev/provenance/v1":
            check_slsa_v1(doc["predicate"])
        elif kind == "https://slsa.dev/provenance/v0.2":
            check_slsa_v02(doc["predicate"])
        elif kind == "https://spdx.dev/Document":
            check_spdx(doc["predicate"])
        else:
            raise ValueError("unexpected predicate type " + kind)
        print("valid", kind, path)


if __name__ == "__main__":
    main(sys.argv[1:])
