#!/usr/bin/env python3
"""A minimal kustomize, for the features deploy/ uses, so that the deploy tests need no kustomize
binary: `resources` (files and directories, recursively), `patches` (strategic merge patches
from `path:` or inline `patch:`, and JSON 6902 patches with a `target:`), `images`
(newName/newTag), and `configMapGenerator` with `files` (only with `generatorOptions:
disableNameSuffixHash: true`: kustomize's name hash is not implemented). Strategic merge follows Kubernetes' merge keys for the lists deploy/ patches
(containers, initContainers, env, volumes by name; volumeMounts by mountPath; ports by
containerPort); other lists are replaced, and `null` deletes a key.

  render.py DIR                 the rendered objects of DIR's kustomization, as a JSON list
  render.py --yaml DIR          ... as a multi-document YAML stream
  render.py --compare DIR...    renders each DIR here and with `kubectl kustomize` (or
                                `kustomize build`) and fails on any difference

Anything else in a kustomization.yaml is refused, so a new feature cannot be silently ignored.
"""
import copy
import json
import os
import shutil
import subprocess
import sys

import yaml

KNOWN = {"apiVersion", "kind", "resources", "patches", "images", "configMapGenerator", "generatorOptions"}
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def smp(base, patch):
    """Strategic merge of patch into base (both dicts); returns the merged dict."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = smp(out[k], v)
        elif isinstance(v, list) and isinstance(out.get(k), list) and k in MERGE_KEYS:
            key = MERGE_KEYS[k]
            merged = copy.deepcopy(out[k])
            for item in v:
                at = next((i for i, m in enumerate(merged) if m.get(key) == item.get(key)), None)
                if at is None:
                    merged.append(copy.deepcopy(item))
                else:
                    merged[at] = smp(merged[at], item)
            out[k] = merged
        else:
            out[k] = copy.deepcopy(v)
    return out


def pointer(path):
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def json6902(doc, ops):
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = pointer(op["path"])
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(idx, op["value"])
            elif kind == "replace":
                parent[idx] = op["value"]
            elif kind == "remove":
                del parent[idx]
            else:
                sys.exit(f"render.py: JSON 6902 op {kind} not supported")
        else:
            if kind in ("add", "replace"):
                parent[last] = op["value"]
            elif kind == "remove":
                del parent[last]
            else:
                sys.exit(f"render.py: JSON 6902 op {kind} not supported")
    return doc


def matches(doc, target):
    return all(
        doc.get(k) == v if k == "kind" else doc["metadata"].get(k) == v
        for k, v in target.items()
        if k in ("kind", "name", "namespace")
    )


def render(directory):
    with open(os.path.join(directory, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - KNOWN
    if unknown:
        sys.exit(f"render.py: {directory}/kustomization.yaml uses {sorted(unknown)}, which this minimal renderer does not implement")
    docs = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(directory, r))
        docs.extend(render(p) if os.path.isdir(p) else load_docs(p))
    options = k.get("generatorOptions") or {}
    if set(options) - {"disableNameSuffixHash"}:
        sys.exit(f"render.py: {directory}: generatorOptions {sorted(options)} not implemented")
    for gen in k.get("configMapGenerator", []):
        if not options.get("disableNameSuffixHash"):
            sys.exit(f"render.py: {directory}: a configMapGenerator needs generatorOptions.disableNameSuffixHash here (the name hash is not implemented)")
        if set(gen) - {"name", "files"}:
            sys.exit(f"render.py: {directory}: configMapGenerator {gen.get('name')} uses {sorted(set(gen) - {'name', 'files'})}, not implemented")
        data = {}
        for f in gen.get("files", []):
            key, _, path = f.partition("=") if "=" in f else (os.path.basename(f), "", f)
            with open(os.path.join(directory, path)) as fh:
                data[key] = fh.read()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for patch in k.get("patches", []):
        if "path" in patch:
            body = load_docs(os.path.join(directory, patch["path"]))
            if len(body) != 1:
                # As kustomize: a patch file holds one object.
                raise SystemExit(f"{directory}: patch {patch['path']} holds {len(body)} objects; kustomize takes one per file")
        else:
            body = [d for d in yaml.safe_load_all(patch["patch"]) if d is not None]
        if len(body) == 1 and isinstance(body[0], list):  # JSON 6902
            target = patch.get("target") or sys.exit("render.py: a JSON 6902 patch needs a target")
            hit = [i for i, d in enumerate(docs) if matches(d, target)]
            if not hit:
                sys.exit(f"render.py: no object matches the patch target {target} in {directory}")
            for i in hit:
                docs[i] = json6902(docs[i], body[0])
            continue
        for p in body:
            target = patch.get("target") or {"kind": p["kind"], "name": p["metadata"]["name"]}
            hit = [i for i, d in enumerate(docs) if matches(d, target)]
            if not hit:
                sys.exit(f"render.py: no object matches the patch {target} in {directory}")
            for i in hit:
                docs[i] = smp(docs[i], {k2: v for k2, v in p.items() if k2 not in ("apiVersion", "kind", "metadata")} | {"metadata": {k2: v for k2, v in p["metadata"].items() if k2 != "name"}})
    for image in k.get("images", []):
        for d in docs:
            spec = d.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return docs


def kustomize_command():
    given = os.environ.get("OSSB_TEST_KUSTOMIZE")
    if given and os.access(given, os.X_OK):
        return [given, "build"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def normalized(x, key=None):
    """Lists merged by a key are compared as sets (kustomize and this renderer order merged
    items differently; Kubernetes does not care, except for env entries that refer to each
    other, which deploy/ does not have)."""
    if isinstance(x, dict):
        return {k: normalized(v, k) for k, v in x.items()}
    if isinstance(x, list):
        items = [normalized(v) for v in x]
        if key in MERGE_KEYS and all(isinstance(i, dict) for i in items):
            items.sort(key=lambda i: json.dumps(i.get(MERGE_KEYS[key]), sort_keys=True))
        return items
    return x


def canonical(docs):
    return sorted(json.dumps(normalized(d), sort_keys=True, indent=1) for d in docs)


def main(argv):
    if argv[:1] == ["--compare"]:
        cmd = kustomize_command()
        if cmd is None:
            print("render.py --compare: no kustomize or kubectl here; nothing compared")
            # Under CI a comparison that cannot run is a failure, not a pass.
            return 1 if os.environ.get("CI") == "true" else 0
        bad = 0
        for d in argv[1:]:
            out = subprocess.run(cmd + [d], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{' '.join(cmd)} {d} failed:\n{out.stderr}")
                bad += 1
                continue
            theirs = canonical(d2 for d2 in yaml.safe_load_all(out.stdout) if d2)
            ours = canonical(render(d))
            if theirs != ours:
                print(f"render.py and {' '.join(cmd)} differ for {d}:")
                import difflib
                a = "\n".join(t for t in theirs if t not in ours).splitlines()
                b = "\n".join(o for o in ours if o not in theirs).splitlines()
                print("\n".join(difflib.unified_diff(a, b, "kustomize", "render.py", lineterm="")))
                bad += 1
            else:
                print(f"same as {' '.join(cmd)}: {d} ({len(ours)} objects)")
        return 1 if bad else 0
    if argv[:1] == ["--yaml"]:
        print(yaml.safe_dump_all(render(argv[1]), sort_keys=False), end="")
        return 0
    print(json.dumps(render(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
