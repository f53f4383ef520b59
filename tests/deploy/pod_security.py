#!/usr/bin/env python3
"""Checks rendered Kubernetes objects against the Pod Security Standards
(kubernetes.io/docs/concepts/security/pod-security-standards, as of Kubernetes 1.37): every
object that makes pods (Pod, Job, CronJob, Deployment, StatefulSet, DaemonSet, ReplicaSet) must
state the level it meets in the annotation `ossb.dev/pod-security` (baseline, restricted or
privileged), and its pod template must meet it. A baseline pod must not have (among the rest):
a privileged container, host namespaces or ports, hostPath volumes, capabilities beyond the
baseline set, Unconfined seccomp or AppArmor, an Unmasked /proc, unsafe sysctls, custom SELinux
types. A restricted pod in addition runs as non-root, drops ALL, sets seccomp and forbids
privilege escalation.

  pod_security.py FILE...        FILE: YAML (one or more documents) or a JSON list of objects;
                                 prints one line per pod-making object, exits 1 on a violation
  pod_security.py --self-test    the checks against objects that break each rule

The upstream evaluator (k8s.io/pod-security-admission) needs a newer Go than the test machines
have (Go 1.19), so the rules are written out here, each with the field path the standard names.
"""
import json
import sys

import yaml

ANNOTATION = "ossb.dev/pod-security"
LEVELS = ("privileged", "baseline", "restricted")
POD_MAKERS = {"Pod", "Job", "CronJob", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}


def pod_spec(obj):
    """The pod spec an object makes, or None."""
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec") or {}
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"].get("spec") or {}
    if kind in POD_MAKERS:
        return obj["spec"]["template"].get("spec") or {}
    return None


def pod_annotations(obj):
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("metadata", {}).get("annotations") or {}
    if kind == "CronJob":
        t = obj["spec"]["jobTemplate"]["spec"]["template"]
    else:
        t = obj["spec"]["template"]
    return (t.get("metadata") or {}).get("annotations") or {}


def containers(spec):
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(field) or []:
            yield f"{field}[{c.get('name')}]", c


def baseline(spec, annotations):
    """The baseline rules this pod spec breaks, as `field: value` lines."""
    bad = []
    psc = spec.get("securityContext") or {}
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        bad.append("spec.securityContext.windowsOptions.hostProcess: true")
    for ns in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(ns):
            bad.append(f"spec.{ns}: true (host namespaces)")
    for v in spec.get("volumes") or []:
        if "hostPath" in v:
            bad.append(f"spec.volumes[{v.get('name')}].hostPath: {v['hostPath'].get('path')}")
    for s in psc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            bad.append(f"spec.securityContext.sysctls: {s.get('name')} (not a safe sysctl)")
    bad += profile_rules("spec.securityContext", psc)
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            bad.append(f"annotation {key}: {value}")
    for where, c in containers(spec):
        sc = c.get("securityContext") or {}
        path = f"spec.{where}.securityContext"
        if sc.get("privileged"):
            bad.append(f"{path}.privileged: true")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"{path}.windowsOptions.hostProcess: true")
        extra = {cap.upper().removeprefix("CAP_") for cap in (sc.get("capabilities") or {}).get("add") or []} - BASELINE_CAPS
        if extra:
            bad.append(f"{path}.capabilities.add: {sorted(extra)} (beyond the baseline set)")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{path}.procMount: {sc['procMount']}")
        bad += profile_rules(path, sc)
        for p in c.get("ports") or []:
            if p.get("hostPort", 0):
                bad.append(f"spec.{where}.ports.hostPort: {p['hostPort']}")
    return bad


def profile_rules(path, sc):
    """seccomp, AppArmor and SELinux of one securityContext (pod or container)."""
    bad = []
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    if seccomp not in (None, "RuntimeDefault", "Localhost"):
        bad.append(f"{path}.seccompProfile.type: {seccomp}")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, "RuntimeDefault", "Localhost"):
        bad.append(f"{path}.appArmorProfile.type: {apparmor}")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES:
        bad.append(f"{path}.seLinuxOptions.type: {selinux['type']}")
    for field in ("user", "role"):
        if selinux.get(field):
            bad.append(f"{path}.seLinuxOptions.{field}: {selinux[field]}")
    return bad


def restricted(spec):
    """The rules restricted adds to baseline."""
    bad = []
    psc = spec.get("securityContext") or {}
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"spec.volumes[{v.get('name')}]: {sorted(kinds)} (not a restricted volume type)")
    if psc.get("runAsUser") == 0:
        bad.append("spec.securityContext.runAsUser: 0")
    for where, c in containers(spec):
        sc = c.get("securityContext") or {}
        path = f"spec.{where}.securityContext"
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{path}.allowPrivilegeEscalation: must be false")
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            bad.append(f"{path}.runAsNonRoot: must be true (here or for the pod)")
        if sc.get("runAsUser") == 0:
            bad.append(f"{path}.runAsUser: 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{path}.seccompProfile: must be RuntimeDefault or Localhost (here or for the pod)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{path}.capabilities.drop: must include ALL")
        extra = {cap.upper().removeprefix("CAP_") for cap in caps.get("add") or []} - {"NET_BIND_SERVICE"}
        if extra:
            bad.append(f"{path}.capabilities.add: {sorted(extra)} (only NET_BIND_SERVICE)")
    return bad


def check(obj):
    """(level stated, what breaks it) for a pod-making object; None for the others."""
    spec = pod_spec(obj)
    if spec is None:
        return None
    level = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
    if level not in LEVELS:
        return level, [f"metadata.annotations[{ANNOTATION}]: {level!r}, must state one of {', '.join(LEVELS)}"]
    bad = []
    if level in ("baseline", "restricted"):
        bad += baseline(spec, pod_annotations(obj))
    if level == "restricted":
        bad += restricted(spec)
    return level, bad


def load(path):
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [d for d in yaml.safe_load_all(text) if d]


def self_test():
    def job(container_sc, pod_sc=None, level="baseline", **spec):
        return {
            "kind": "Job", "metadata": {"name": "t", "annotations": {ANNOTATION: level}},
            "spec": {"template": {"spec": {
                "securityContext": pod_sc or {},
                "containers": [{"name": "c", "securityContext": container_sc}], **spec}}},
        }
    ok = {"capabilities": {"drop": ["ALL"], "add": ["SETUID", "SETGID", "SETFCAP"]},
          "seccompProfile": {"type": "Localhost", "localhostProfile": "ossb-rootless.json"},
          "appArmorProfile": {"type": "Localhost", "localhostProfile": "ossb-rootless"},
          "procMount": "Default", "allowPrivilegeEscalation": False}
    cases = [
        ("a rootless pod of deploy/", job(ok), []),
        ("Unconfined seccomp", job(ok | {"seccompProfile": {"type": "Unconfined"}}), ["seccompProfile.type: Unconfined"]),
        ("Unconfined seccomp for the pod", job(ok, {"seccompProfile": {"type": "Unconfined"}}), ["spec.securityContext.seccompProfile"]),
        ("Unconfined AppArmor", job(ok | {"appArmorProfile": {"type": "Unconfined"}}), ["appArmorProfile.type: Unconfined"]),
        ("unconfined AppArmor annotation", {**job(ok), "spec": {"template": {"metadata": {"annotations": {"container.apparmor.security.beta.kubernetes.io/c": "unconfined"}}, "spec": job(ok)["spec"]["template"]["spec"]}}}, ["annotation container.apparmor"]),
        ("Unmasked /proc", job(ok | {"procMount": "Unmasked"}), ["procMount: Unmasked"]),
        ("SYS_ADMIN", job(ok | {"capabilities": {"add": ["SYS_ADMIN"]}}), ["SYS_ADMIN"]),
        ("CAP_NET_ADMIN spelled with CAP_", job(ok | {"capabilities": {"add": ["CAP_NET_ADMIN"]}}), ["NET_ADMIN"]),
        ("privileged", job(ok | {"privileged": True}), ["privileged: true"]),
        ("hostPath", job(ok, volumes=[{"name": "h", "hostPath": {"path": "/"}}]), ["hostPath: /"]),
        ("hostPID", job(ok, hostPID=True), ["hostPID"]),
        ("hostNetwork", job(ok, hostNetwork=True), ["hostNetwork"]),
        ("hostPort", job(ok, containers=[{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}]}]), ["hostPort: 80"]),
        ("unsafe sysctl", job(ok, {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}), ["kernel.msgmax"]),
        ("SELinux type", job(ok | {"seLinuxOptions": {"type": "spc_t"}}), ["spc_t"]),
        ("no level stated", {**job(ok), "metadata": {"name": "t"}}, ["must state one of"]),
        ("restricted as root", job(ok, level="restricted"), ["runAsNonRoot", "SETUID"]),
        ("restricted allows the coordinator's", job({"capabilities": {"drop": ["ALL"]}, "allowPrivilegeEscalation": False},
                                                    {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                                                    level="restricted", volumes=[{"name": "s", "secret": {"secretName": "x"}}]), []),
        ("privileged allows anything", job(ok | {"privileged": True}, level="privileged"), []),
    ]
    failed = 0
    for name, obj, want in cases:
        _, bad = check(obj)
        text = "\n".join(bad)
        good = all(w in text for w in want) and (bool(bad) == bool(want))
        if not good:
            failed += 1
            print(f"self-test FAILED: {name}: wanted {want or 'no violation'}, got {bad or 'none'}")
    print(f"pod_security.py self-test: {len(cases) - failed} of {len(cases)} cases as expected")
    return 1 if failed else 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    failed = 0
    for path in argv:
        for obj in load(path):
            result = check(obj)
            if result is None:
                continue
            level, bad = result
            name = f"{obj['kind']}/{obj['metadata']['name']}"
            if bad:
                failed += 1
                print(f"FAILED: {path}: {name} claims {level!r} but has:")
                for b in bad:
                    print(f"  {b}")
            else:
                print(f"{level}: {path}: {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
