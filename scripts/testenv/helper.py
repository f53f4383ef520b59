#!/usr/bin/env python3
"""Helpers for scripts/testenv.sh: ports, HTTP probes, rootfs, OCI layouts, evil layers.

Only the Python standard library is used. Every subcommand prints nothing on success unless it
has a result to print, and exits non-zero with a message on stderr on failure.
"""

import argparse
import base64
import gzip
import hashlib
import io
import json
import os
import socket
import ssl
import sys
import tarfile
import time
import urllib.error
import urllib.request

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EPOCH = "1970-01-01T00:00:00Z"
PLATFORMS = {
    "amd64": {"architecture": "amd64", "os": "linux"},
    "arm64": {"architecture": "arm64", "os": "linux", "variant": "v8"},
}


def die(msg):
    print(f"helper.py: {msg}", file=sys.stderr)
    sys.exit(1)


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- ports and probes

def port_free(port):
    """Whether a server (which sets SO_REUSEADDR, as Go does) can listen on the port now."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def cmd_free_ports(args):
    """Print N distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(args.count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        print(" ".join(str(s.getsockname()[1]) for s in socks))
    finally:
        for s in socks:
            s.close()


def cmd_port_free(args):
    sys.exit(0 if port_free(args.port) else 1)


class Client:
    def __init__(self, base, cafile=None, user=None, password=None, timeout=5.0):
        self.base = base.rstrip("/")
        self.ctx = None
        if base.startswith("https://"):
            self.ctx = ssl.create_default_context(cafile=cafile)
        self.auth = None
        if user is not None:
            self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = timeout

    def request(self, path, method="GET", accept=None, auth=True):
        req = urllib.request.Request(self.base + path, method=method)
        if accept:
            req.add_header("Accept", accept)
        if auth and self.auth:
            req.add_header("Authorization", self.auth)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.ctx) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


def cmd_wait_registry(args):
    """Wait until BASE/v2/ answers as expected: 200 without auth, or 401 without and 200 with."""
    c = Client(args.base, args.cafile, args.user, args.password, timeout=2.0)
    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while True:
        try:
            if args.user is None:
                st, _, _ = c.request("/v2/")
                if st == 200:
                    return
                last = f"GET /v2/ answered {st}, expected 200"
            else:
                st, hdrs, _ = c.request("/v2/", auth=False)
                if st != 401:
                    last = f"GET /v2/ without credentials answered {st}, expected 401"
                else:
                    st, _, _ = c.request("/v2/")
                    if st == 200:
                        return
                    last = f"GET /v2/ with credentials answered {st}, expected 200"
        except (OSError, ssl.SSLError) as e:  # URLError is an OSError
            last = str(e)
            if isinstance(getattr(e, "reason", None), ssl.SSLCertVerificationError):
                die(f"{args.base}: TLS verification failed with {args.cafile}: {e}")
        if time.monotonic() > deadline:
            die(f"{args.base}/v2/ not ready after {args.timeout}s: {last}")
        if args.pid and not os.path.exists(f"/proc/{args.pid}"):
            die(f"{args.base}: registry process {args.pid} exited: {last}")
        time.sleep(0.05)


def layout_ref_digest(layout, ref):
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    for d in index["manifests"]:
        if d.get("annotations", {}).get(REF_NAME) == ref:
            return d["digest"]
    die(f"{layout}: no ref {ref}")


def check_image(c, repo, tag, digest):
    """Raises LookupError unless REPO:TAG is DIGEST in the registry with all its manifests and blobs."""
    accept = ",".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

    def manifest(ref):
        st, _, body = c.request(f"/v2/{repo}/manifests/{ref}", accept=accept)
        if st != 200:
            raise LookupError(f"manifest {repo}:{ref}: HTTP {st}")
        return body

    def blob(d):
        st, _, _ = c.request(f"/v2/{repo}/blobs/{d}", method="HEAD")
        if st != 200:
            raise LookupError(f"blob {repo}@{d}: HTTP {st}")

    body = manifest(tag)
    if sha256(body) != digest:
        raise LookupError(f"{repo}:{tag} is {sha256(body)}, expected {digest}")
    todo = [json.loads(body)]
    while todo:
        m = todo.pop()
        for d in m.get("manifests", []):
            child = manifest(d["digest"])
            if sha256(child) != d["digest"]:
                raise LookupError(f"{repo}@{d['digest']}: content does not match")
            todo.append(json.loads(child))
        if "config" in m:
            blob(m["config"]["digest"])
        for layer in m.get("layers", []):
            blob(layer["digest"])


def cmd_check_images(args):
    """stdin: lines `BASE REPO TAG LAYOUT REF`. Prints the lines whose image is missing or differs
    from LAYOUT:REF (https bases use --cafile/--user/--password)."""
    clients = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        base, repo, tag, layout, ref = line.split()
        if base not in clients:
            https = base.startswith("https://")
            clients[base] = Client(base, args.cafile if https else None,
                                   args.user if https else None, args.password)
        try:
            check_image(clients[base], repo, tag, layout_ref_digest(layout, ref))
        except (LookupError, OSError) as e:
            if args.verbose:
                print(f"{base}: {e}", file=sys.stderr)
            print(line.strip())


def cmd_docker_config(args):
    """Prints a Docker config.json with basic-auth `auths` for the given registries."""
    auth = base64.b64encode(f"{args.user}:{args.password}".encode()).decode()
    cfg = {"auths": {reg: {"auth": auth} for reg in args.registry}}
    print(json.dumps(cfg, indent=2, sort_keys=True))


# ---------------------------------------------------------------- rootfs

def cmd_rootfs(args):
    """A busybox rootfs: bin/busybox, applet symlinks, users, groups, standard directories."""
    root = args.out
    os.makedirs(root)
    dirs = {
        "bin": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "home/app": 0o755,
        "proc": 0o755, "root": 0o700, "sbin": 0o755, "sys": 0o755, "tmp": 0o1777,
        "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "var": 0o755,
        "var/tmp": 0o1777,
    }
    for d in sorted(dirs):
        os.mkdir(os.path.join(root, d))
    with open(args.busybox, "rb") as f:
        data = f.read()
    with open(os.path.join(root, "bin/busybox"), "wb") as f:
        f.write(data)
    os.chmod(os.path.join(root, "bin/busybox"), 0o755)
    applets = [line.strip() for line in open(args.applets) if line.strip()]
    if "bin/sh" not in applets:
        die("the applet list has no bin/sh")
    n = 0
    for path in applets:
        if path == "bin/busybox" or "/" not in path:  # itself, and /linuxrc
            continue
        parent = os.path.dirname(path)
        if parent not in dirs:
            die(f"applet {path}: unexpected directory {parent}")
        target = "busybox" if parent == "bin" else "../" * path.count("/") + "bin/busybox"
        os.symlink(target, os.path.join(root, path))
        n += 1
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"
                      "app:x:1000:1000:app:/home/app:/bin/sh\n"
                      "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n",
    }
    for path, content in files.items():
        with open(os.path.join(root, path), "w") as f:
            f.write(content)
        os.chmod(os.path.join(root, path), 0o644)
    for d, mode in dirs.items():
        os.chmod(os.path.join(root, d), mode)  # not subject to the umask
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), 0, 0)
    os.lchown(os.path.join(root, "home/app"), 1000, 1000)
    print(n)


# ---------------------------------------------------------------- OCI layouts

class Layout:
    """An OCI image layout written by hand; blobs are content addressed."""

    def __init__(self, path):
        self.path = path
        self.refs = []
        os.makedirs(os.path.join(path, "blobs", "sha256"))
        with open(os.path.join(path, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')

    def blob(self, data, media_type, platform=None):
        digest = sha256(data)
        p = os.path.join(self.path, "blobs", "sha256", digest.split(":")[1])
        if not os.path.exists(p):
            with open(p, "wb") as f:
                f.write(data)
        desc = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if platform:
            desc["platform"] = dict(platform)
        return desc

    def image(self, arch, layers, created_by):
        """layers: list of (gzip bytes, diff_id). Returns the manifest descriptor with platform."""
        plat = PLATFORMS[arch]
        config = dict(plat)
        config.update({
            "created": EPOCH,
            "config": {"Env": [PATH_ENV], "Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
            "history": [{"created": EPOCH, "created_by": cb} for cb in created_by],
        })
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.blob(canonical(config), OCI_CONFIG),
            "layers": [self.blob(gz, OCI_LAYER_GZIP) for gz, _ in layers],
        }
        return self.blob(canonical(manifest), OCI_MANIFEST, plat)

    def index(self, manifests):
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return self.blob(canonical(index), OCI_INDEX)

    def ref(self, name, desc):
        d = dict(desc)
        d["annotations"] = {REF_NAME: name}
        self.refs.append(d)

    def finish(self):
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.refs}
        with open(os.path.join(self.path, "index.json"), "wb") as f:
            f.write(canonical(index))


def read_layer(path):
    with open(path, "rb") as f:
        gz = f.read()
    return gz, sha256(gzip.decompress(gz))


def cmd_busybox_layout(args):
    """index.json refs: `latest` (the multi-arch index), `amd64` and `arm64` (the manifests)."""
    lay = Layout(args.out)
    manifests = []
    for spec in args.layer:
        arch, path = spec.split("=", 1)
        desc = lay.image(arch, [read_layer(path)], [args.created_by])
        manifests.append(desc)
        lay.ref(arch, desc)
    lay.ref("latest", lay.index(manifests))
    lay.finish()


def tar_entry(tf, name, kind, data=b"", linkname="", mode=None):
    ti = tarfile.TarInfo(name)
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    if kind == "file":
        ti.type = tarfile.REGTYPE
        ti.mode = 0o644 if mode is None else mode
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    else:
        ti.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
        ti.mode = 0o777 if kind == "symlink" else 0o644
        ti.linkname = linkname
        tf.addfile(ti)


# Each case is a list of entries of the second layer; see scripts/testenv/README.md.
EVIL_CASES = {
    "dotdot": [
        ("../escape", "file", b"escaped", ""),
    ],
    "symlink": [
        ("etc/evil-link", "symlink", b"", "/tmp"),
        ("etc/evil-link/ossb-evil-file", "file", b"escaped through an absolute symlink\n", ""),
    ],
    "symlink-up": [
        ("up", "symlink", b"", "../../../../.."),
        ("up/tmp/ossb-evil-file2", "file", b"escaped through a relative symlink\n", ""),
    ],
    "hardlink": [
        ("etc/hl", "hardlink", b"", "/etc/passwd"),
        ("etc/hl-shadow", "hardlink", b"", "../../../../etc/shadow"),
    ],
}
EVIL_IMAGES = {
    "evil": ["dotdot", "symlink", "symlink-up", "hardlink"],
    "evil-dotdot": ["dotdot"],
    "evil-symlink": ["symlink"],
    "evil-symlink-up": ["symlink-up"],
    "evil-hardlink": ["hardlink"],
}


def cmd_evil_layouts(args):
    """One layout per evil image under OUT/NAME, ref `latest`, linux/amd64, two layers."""
    base = read_layer(args.base_layer)
    for image, cases in EVIL_IMAGES.items():
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
            for case in cases:
                for name, kind, data, link in EVIL_CASES[case]:
                    tar_entry(tf, name, kind, data, link)
        raw = buf.getvalue()
        evil = (gzip.compress(raw, compresslevel=6, mtime=0), sha256(raw))
        lay = Layout(os.path.join(args.out, image))
        desc = lay.image("amd64", [base, evil], [args.created_by, f"ossb testenv: {image} ({', '.join(cases)})"])
        del desc["platform"]
        lay.ref("latest", desc)
        lay.finish()


def cmd_ref_digest(args):
    print(layout_ref_digest(args.layout, args.ref))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("free-ports")
    s.add_argument("count", type=int)
    s.set_defaults(fn=cmd_free_ports)
    s = sub.add_parser("port-free")
    s.add_argument("port", type=int)
    s.set_defaults(fn=cmd_port_free)
    s = sub.add_parser("wait-registry")
    s.add_argument("base")
    s.add_argument("--timeout", type=float, default=20)
    s.add_argument("--pid", type=int)
    s.set_defaults(fn=cmd_wait_registry)
    s2 = sub.add_parser("check-images")
    s2.add_argument("--verbose", action="store_true")
    s2.set_defaults(fn=cmd_check_images)
    for s in (s, s2):
        s.add_argument("--cafile")
        s.add_argument("--user")
        s.add_argument("--password")
    s = sub.add_parser("docker-config")
    s.add_argument("--user", required=True)
    s.add_argument("--password", required=True)
    s.add_argument("--registry", action="append", required=True)
    s.set_defaults(fn=cmd_docker_config)
    s = sub.add_parser("rootfs")
    s.add_argument("--busybox", required=True)
    s.add_argument("--applets", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_rootfs)
    s = sub.add_parser("busybox-layout")
    s.add_argument("--out", required=True)
    s.add_argument("--layer", action="append", required=True, help="ARCH=PATH.tar.gz")
    s.add_argument("--created-by", required=True)
    s.set_defaults(fn=cmd_busybox_layout)
    s = sub.add_parser("evil-layouts")
    s.add_argument("--out", required=True)
    s.add_argument("--base-layer", required=True)
    s.add_argument("--created-by", required=True)
    s.set_defaults(fn=cmd_evil_layouts)
    s = sub.add_parser("ref-digest")
    s.add_argument("layout")
    s.add_argument("ref")
    s.set_defaults(fn=cmd_ref_digest)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
