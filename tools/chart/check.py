#!/usr/bin/env python3
"""Checks the Helm chart (helm/afnext) and the local deployment files (deploy/) without a cluster, Docker or
the helm binary:

  1. values.yaml documents every key; values.schema.json is generated from gen_schema.py, closes every object
     the chart defines, and accepts the defaults.
  2. Helm's own engine (PyPI helm-python-sdk: Helm's Go SDK through a C ABI) lints the chart and renders it for
     several values combinations; every rendered manifest is validated offline against the Kubernetes
     JSON schemas of KUBE_VERSION (PyPI kubernetes-validate, strict: unknown fields fail). Only CRD kinds
     (ServiceMonitor) have no schema there and are skipped.
  3. Assertions per combination: TP=1/4 GPUs and ranks, external etcd, encoder HPA on/off, TLS, API keys,
     ServiceMonitor on/off, CPU-only, unknown and mistyped values refused by the schema.
  4. Every `afnext` command line (chart and deploy/docker-compose.yml) uses a subcommand and flags that
     `$AFNEXT_BIN <subcommand> --help` lists (default target/debug/afnext).
  5. deploy/docker-compose.yml, deploy/Dockerfile (stage names), deploy/prometheus.yml and
     deploy/grafana/afnext-dashboard.json (metric names against docs/METRICS.md): check_deploy.py.

Run with the venv of tools/chart/requirements.txt:  python tools/chart/check.py   (exit 1 on any failure)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

try:
    import helm_python as helm
    import kubernetes_validate
except ImportError as e:  # pragma: no cover
    sys.exit(f"{e}: install tools/chart/requirements.txt into a venv first (see helm/README.md)")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from values_doc import key_docs  # noqa: E402

from chart_common import AFNEXT_BIN, CHART, R, check_afnext_argv, flag_values, shell_commands  # noqa: E402
from check_deploy import check_compose, check_dashboard, check_dockerfile  # noqa: E402

KUBE_VERSION = "1.30.0"
# Kinds whose schemas are CustomResourceDefinitions, absent from the Kubernetes schemas: not validated.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
RELEASE, NAMESPACE = "demo", "ml"
FULL = f"{RELEASE}-afnext"


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


class Rendered:
    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.docs: list[dict] = []
        for path, text in sorted(files.items()):
            if path.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc["__file"] = path
                    self.docs.append(doc)

    @property
    def notes(self) -> str:
        return next((t for p, t in self.files.items() if p.endswith("NOTES.txt")), "")

    def kinds(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict | None:
        return next((d for d in self.kinds(kind) if d["metadata"]["name"] == name), None)

    def workloads(self) -> list[dict]:
        return [d for d in self.docs if d.get("kind") in ("Deployment", "StatefulSet")]

    def afnext_containers(self) -> list[tuple[dict, dict]]:
        """(workload, container) of every container that runs afnext."""
        out = []
        for w in self.workloads():
            for c in w["spec"]["template"]["spec"]["containers"]:
                if "afnext" in c["image"].rsplit("/", 1)[-1]:
                    out.append((w, c))
        return out


def afnext_argvs(container: dict) -> list[list[str]]:
    cmd = container.get("command", []) + container.get("args", [])
    if cmd[:1] == ["afnext"]:
        return [cmd]
    if cmd[:2] == ["bash", "-c"]:
        return shell_commands(cmd[2])
    return []


def render(values: dict) -> Rendered:
    with helm.Chart.load(str(CHART)) as chart:
        return Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))


def validate_kube(r: Rendered, label: str) -> None:
    names = set()
    for doc in r.docs:
        kind, api = doc.get("kind"), doc.get("apiVersion")
        key = (kind, doc.get("metadata", {}).get("name"))
        R.check(key not in names, f"[{label}] {kind}/{key[1]} is unique")
        names.add(key)
        if (api, kind) in CRD_KINDS:
            continue
        body = {k: v for k, v in doc.items() if k != "__file"}
        try:
            kubernetes_validate.validate(body, KUBE_VERSION, strict=True)
            R.check(True, "")
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            R.check(False, f"[{label}] {kind}/{key[1]} valid for Kubernetes {KUBE_VERSION}", f"{path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            R.check(False, f"[{label}] {kind}/{key[1]} has a Kubernetes schema", e.message)


def gpus(container: dict) -> int:
    lim = container.get("resources", {}).get("limits", {})
    return int(lim.get("nvidia.com/gpu", 0))


def role_argvs(r: Rendered) -> dict[str, list[list[str]]]:
    """Every afnext command line by role (router, encoder, decoder)."""
    roles: dict[str, list[list[str]]] = {}
    for w, c in r.afnext_containers():
        for argv in afnext_argvs(c):
            roles.setdefault(argv[1], []).append(argv)
    return roles


def pod_spec(r: Rendered, kind: str, component: str) -> dict:
    w = r.get(kind, f"{FULL}-{component}")
    assert w is not None, f"{kind} {FULL}-{component} missing"
    return w["spec"]["template"]["spec"]


# --------------------------------------------------------------------------------------------------------------
# Combinations
# --------------------------------------------------------------------------------------------------------------

Check = Callable[[Rendered], None]
COMBOS: list[tuple[str, dict, Check]] = []


def combo(label: str, values: dict) -> Callable[[Check], Check]:
    def deco(fn: Check) -> Check:
        COMBOS.append((label, values, fn))
        return fn

    return deco


def common_checks(label: str, r: Rendered, values: dict) -> None:
    """What every combination must satisfy."""
    roles = role_argvs(r)
    for role in ("router", "encoder", "decoder"):
        R.check(role in roles, f"[{label}] an `afnext {role}` runs")
    for w, c in r.afnext_containers():
        where = f"[{label}] {w['kind']}/{w['metadata']['name']}"
        argvs = afnext_argvs(c)
        R.check(bool(argvs), f"{where}: afnext command found")
        for argv in argvs:
            check_afnext_argv(argv, where)
        # Probes on the metrics port, served by the process that has --metrics-listen.
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for probe, path in (("startupProbe", "/live"), ("livenessProbe", "/live"), ("readinessProbe", "/ready")):
            p = c.get(probe, {}).get("httpGet", {})
            R.check(p.get("path") == path and p.get("port") == "metrics", f"{where}: {probe} GET {path} on metrics")
        st = c.get("startupProbe", {})
        R.check(
            st.get("periodSeconds", 0) * st.get("failureThreshold", 0) >= 30 * 60,
            f"{where}: startup probe allows 30+ minutes",
        )
        servers = [a for a in argvs if flag_values(a, "--metrics-listen")]
        R.check(len(servers) == 1, f"{where}: exactly one process serves metrics")
        if servers:
            port = int(flag_values(servers[0], "--metrics-listen")[0].rsplit(":", 1)[1])
            R.check(ports.get("metrics") == port, f"{where}: metrics containerPort = --metrics-listen port")
        # Every process that registers or discovers has the etcd endpoints.
        leaders = [a for a in argvs if a[1] != "decoder" or "--rank=0" in a]
        for a in leaders:
            R.check(bool(flag_values(a, "--etcd-endpoints")), f"{where}: {a[1]} has --etcd-endpoints")
        # Model cache: HF_HOME (ConfigMap) points at the mounted volume.
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        R.check("model-cache" in mounts, f"{where}: model cache mounted")
    cm = r.get("ConfigMap", f"{FULL}-env")
    if R.check(cm is not None, f"[{label}] ConfigMap {FULL}-env"):
        R.check(cm["data"].get("HF_HOME") == "/var/cache/huggingface", f"[{label}] HF_HOME is the model cache")
    R.check("afnext ask" in r.notes and "grpcurl" in r.notes, f"[{label}] NOTES.txt shows grpcurl and afnext ask")
    for kind in ("Deployment", "StatefulSet"):
        for w in r.kinds(kind):
            sel = w["spec"]["selector"]["matchLabels"]
            labels = w["spec"]["template"]["metadata"]["labels"]
            R.check(
                all(labels.get(k) == v for k, v in sel.items()),
                f"[{label}] {kind}/{w['metadata']['name']} selector matches its pods",
            )
    for svc in r.kinds("Service"):
        sel = svc["spec"].get("selector", {})
        R.check(
            any(all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
                for w in r.workloads()),
            f"[{label}] Service/{svc['metadata']['name']} selects pods",
        )
    for pdb in r.kinds("PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        R.check(
            any(all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
                for w in r.workloads()),
            f"[{label}] PodDisruptionBudget/{pdb['metadata']['name']} selects pods",
        )


def decoder_checks(label: str, r: Rendered, tp: int, groups: int) -> None:
    sts = r.get("StatefulSet", f"{FULL}-decoder")
    if not R.check(sts is not None, f"[{label}] decoder StatefulSet"):
        return
    R.check(sts["spec"]["replicas"] == groups, f"[{label}] {groups} decoder group(s)", str(sts["spec"]["replicas"]))
    spec = sts["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    R.check(gpus(c) == tp, f"[{label}] decoder pod requests nvidia.com/gpu: {tp}", str(gpus(c)))
    R.check(
        int(c["resources"]["requests"].get("nvidia.com/gpu", 0)) == tp,
        f"[{label}] decoder GPU request = limit",
    )
    R.check(c["image"].endswith("-cuda"), f"[{label}] decoder uses the CUDA image", c["image"])
    argvs = afnext_argvs(c)
    R.check(len(argvs) == tp, f"[{label}] {tp} `afnext decoder` rank(s) in the pod", str(len(argvs)))
    ranks = sorted(int(flag_values(a, "--rank")[0]) for a in argvs)
    R.check(ranks == list(range(tp)), f"[{label}] ranks 0..{tp - 1}", str(ranks))
    for a in argvs:
        rank = int(flag_values(a, "--rank")[0])
        R.check(flag_values(a, "--tp") == [str(tp)], f"[{label}] rank {rank} has --tp={tp}")
        R.check(flag_values(a, "--device") == [f"cuda:{rank}"], f"[{label}] rank {rank} on cuda:{rank}")
        R.check(
            flag_values(a, "--group-addr") == ["127.0.0.1:29500"], f"[{label}] rank {rank} meets on 127.0.0.1:29500"
        )
        serves = bool(flag_values(a, "--listen"))
        R.check(serves == (rank == 0), f"[{label}] only rank 0 listens (rank {rank})")
        R.check(bool(flag_values(a, "--advertise")) == (rank == 0), f"[{label}] only rank 0 advertises (rank {rank})")
    vols = {v["name"]: v for v in spec["volumes"]}
    shm = vols.get("dshm", {}).get("emptyDir", {})
    R.check(shm.get("medium") == "Memory", f"[{label}] memory emptyDir for /dev/shm")
    R.check(
        any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"]), f"[{label}] /dev/shm mounted in the decoder"
    )
    env = {e["name"] for e in c.get("env", [])}
    R.check(any(n.startswith("NCCL_") for n in env), f"[{label}] NCCL environment set")
    R.check("POD_IP" in env, f"[{label}] POD_IP from the downward API")


def hpa_for(r: Rendered, component: str) -> dict | None:
    return r.get("HorizontalPodAutoscaler", f"{FULL}-{component}")


@combo("defaults", {})
def _defaults(r: Rendered) -> None:
    L = "defaults"
    decoder_checks(L, r, tp=1, groups=1)
    R.check(r.get("StatefulSet", f"{FULL}-etcd") is not None, f"[{L}] bundled etcd StatefulSet")
    endpoint = f"http://{FULL}-etcd:2379"
    for role, argvs in role_argvs(r).items():
        for a in argvs:
            if role != "decoder" or "--rank=0" in a:
                R.check(flag_values(a, "--etcd-endpoints") == [endpoint], f"[{L}] {role} uses the bundled etcd")
    enc = r.get("Deployment", f"{FULL}-encoder")
    R.check("replicas" not in enc["spec"], f"[{L}] encoder replicas left to the HPA")
    hpa = hpa_for(r, "encoder")
    if R.check(hpa is not None, f"[{L}] encoder HPA present"):
        kinds = [m["type"] for m in hpa["spec"]["metrics"]]
        R.check(kinds == ["Resource"], f"[{L}] encoder HPA scales on CPU", str(kinds))
    R.check(hpa_for(r, "router") is None, f"[{L}] no router HPA by default")
    R.check(r.get("Deployment", f"{FULL}-router")["spec"]["replicas"] == 2, f"[{L}] 2 routers")
    R.check(not r.kinds("ServiceMonitor"), f"[{L}] no ServiceMonitor by default")
    R.check(not r.kinds("Secret"), f"[{L}] no Secret by default")
    R.check(len(r.kinds("PodDisruptionBudget")) == 3, f"[{L}] PDBs for router, encoder, decoder")
    R.check(r.get("PersistentVolumeClaim", f"{FULL}-model-cache") is not None, f"[{L}] model cache PVC")
    for w, c in r.afnext_containers():
        R.check(
            not any(a.startswith("--tls") for argv in afnext_argvs(c) for a in argv),
            f"[{L}] {w['metadata']['name']}: no TLS flags",
        )
        init = [i["name"] for i in w["spec"]["template"]["spec"].get("initContainers", [])]
        R.check(init == ["prefetch-model"], f"[{L}] {w['metadata']['name']}: model prefetch init container")
    enc_c = pod_spec(r, "Deployment", "encoder")["containers"][0]
    R.check(gpus(enc_c) == 1, f"[{L}] encoder worker has 1 GPU")
    router_c = pod_spec(r, "Deployment", "router")["containers"][0]
    R.check(gpus(router_c) == 0 and not router_c["image"].endswith("-cuda"), f"[{L}] router on CPU image")


@combo("tp4", {"decoder": {"tp": 4, "groups": 2}})
def _tp4(r: Rendered) -> None:
    decoder_checks("tp4", r, tp=4, groups=2)
    (c,) = pod_spec(r, "StatefulSet", "decoder")["containers"]
    R.check("/proc/net/tcp" in c["command"][2], "[tp4] ranks 1..3 wait for rank 0's group port")


@combo("tp2", {"decoder": {"tp": 2}})
def _tp2(r: Rendered) -> None:
    decoder_checks("tp2", r, tp=2, groups=1)


@combo("external-etcd", {"etcd": {"enabled": False, "endpoints": ["http://etcd-a:2379", "http://etcd-b:2379"]}})
def _external_etcd(r: Rendered) -> None:
    L = "external-etcd"
    R.check(r.get("StatefulSet", f"{FULL}-etcd") is None, f"[{L}] no bundled etcd StatefulSet")
    R.check(r.get("Service", f"{FULL}-etcd") is None, f"[{L}] no bundled etcd Service")
    want = ["http://etcd-a:2379,http://etcd-b:2379"]
    roles = role_argvs(r)
    for role in ("router", "encoder", "decoder"):
        for a in roles.get(role, []):
            if role != "decoder" or "--rank=0" in a:
                R.check(flag_values(a, "--etcd-endpoints") == want, f"[{L}] {role} gets the external endpoints")


@combo("encoders-fixed", {"encoder": {"replicas": 3, "autoscaling": {"enabled": False}}})
def _encoders_fixed(r: Rendered) -> None:
    L = "encoders-fixed"
    R.check(hpa_for(r, "encoder") is None, f"[{L}] no encoder HPA")
    R.check(r.get("Deployment", f"{FULL}-encoder")["spec"].get("replicas") == 3, f"[{L}] 3 encoder replicas")


@combo(
    "encoders-queue-depth",
    {"encoder": {"autoscaling": {"minReplicas": 3, "maxReplicas": 12, "queueDepth": {"enabled": True}}},
     "router": {"autoscaling": {"enabled": True}}},
)
def _queue_depth(r: Rendered) -> None:
    L = "encoders-queue-depth"
    hpa = hpa_for(r, "encoder")
    if R.check(hpa is not None, f"[{L}] encoder HPA present"):
        R.check((hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12), f"[{L}] HPA bounds")
        pods = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        R.check(
            len(pods) == 1 and pods[0]["pods"]["metric"]["name"] == "afnext_encoder_queue_depth",
            f"[{L}] HPA on afnext_encoder_queue_depth",
        )
    R.check(hpa_for(r, "router") is not None, f"[{L}] router HPA present")
    R.check("replicas" not in r.get("Deployment", f"{FULL}-router")["spec"], f"[{L}] router replicas left to HPA")


@combo("tls", {"tls": {"enabled": True, "secretName": "afnext-tls", "mutual": True}})
def _tls(r: Rendered) -> None:
    L = "tls"
    for w, c in r.afnext_containers():
        name = w["metadata"]["name"]
        vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        R.check(vols.get("tls", {}).get("secret", {}).get("secretName") == "afnext-tls", f"[{L}] {name}: TLS secret volume")
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        R.check(mounts.get("tls") == "/etc/afnext/tls", f"[{L}] {name}: TLS secret mounted")
        for a in afnext_argvs(c):
            if a[1] == "decoder" and "--rank=0" not in a:
                continue  # followers have no listener and dial nothing
            for flag, path in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"), ("--tls-ca", "ca.crt")):
                R.check(flag_values(a, flag) == [f"/etc/afnext/tls/{path}"], f"[{L}] {name}: {a[1]} {flag}")
            want_client_ca = a[1] != "router"
            R.check(
                bool(flag_values(a, "--tls-client-ca")) == want_client_ca,
                f"[{L}] {name}: {a[1]} --tls-client-ca only on internal listeners",
            )
            R.check(flag_values(a, "--tls-server-name") == ["afnext-internal"], f"[{L}] {name}: --tls-server-name")


@combo("api-keys", {"apiKeys": {"enabled": True, "keys": ["k1", "k2"]}})
def _api_keys(r: Rendered) -> None:
    L = "api-keys"
    sec = r.get("Secret", f"{FULL}-api-keys")
    if R.check(sec is not None, f"[{L}] API keys Secret created"):
        R.check(sec["stringData"]["api-keys"].split() == ["k1", "k2"], f"[{L}] one key per line")
    spec = pod_spec(r, "Deployment", "router")
    vols = {v["name"]: v for v in spec["volumes"]}
    R.check(vols.get("api-keys", {}).get("secret", {}).get("secretName") == f"{FULL}-api-keys", f"[{L}] router mounts it")
    (argv,) = afnext_argvs(spec["containers"][0])
    R.check(flag_values(argv, "--api-keys-file") == ["/etc/afnext/api-keys/api-keys"], f"[{L}] router --api-keys-file")
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    R.check(mounts.get("api-keys") == "/etc/afnext/api-keys", f"[{L}] keys file path is the mount")
    for role in ("encoder", "decoder"):
        R.check(
            not any(flag_values(a, "--api-keys-file") for a in role_argvs(r)[role]), f"[{L}] {role} has no API keys"
        )
    R.check("authorization: Bearer" in r.notes, f"[{L}] NOTES.txt shows the bearer header")


@combo("api-keys-existing", {"apiKeys": {"enabled": True, "existingSecret": "my-keys", "secretKey": "keys.txt"}})
def _api_keys_existing(r: Rendered) -> None:
    L = "api-keys-existing"
    R.check(not r.kinds("Secret"), f"[{L}] no chart Secret")
    spec = pod_spec(r, "Deployment", "router")
    vols = {v["name"]: v for v in spec["volumes"]}
    R.check(vols.get("api-keys", {}).get("secret", {}).get("secretName") == "my-keys", f"[{L}] router mounts my-keys")
    (argv,) = afnext_argvs(spec["containers"][0])
    R.check(flag_values(argv, "--api-keys-file") == ["/etc/afnext/api-keys/keys.txt"], f"[{L}] --api-keys-file")


@combo("servicemonitor", {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
def _servicemonitor(r: Rendered) -> None:
    L = "servicemonitor"
    sms = r.kinds("ServiceMonitor")
    if R.check(len(sms) == 1, f"[{L}] one ServiceMonitor"):
        sm = sms[0]
        R.check(sm["apiVersion"] == "monitoring.coreos.com/v1", f"[{L}] monitoring.coreos.com/v1")
        R.check(sm["metadata"]["labels"].get("release") == "prom", f"[{L}] extra labels")
        sel = sm["spec"]["selector"]["matchLabels"]
        matched = sorted(
            s["metadata"]["name"] for s in r.kinds("Service")
            if all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())
        )
        R.check(
            matched == sorted(f"{FULL}-{c}" for c in ("decoder", "encoder", "router")),
            f"[{L}] selects the router, encoder and decoder Services",
            str(matched),
        )
        for s in r.kinds("Service"):
            if s["metadata"]["name"] in matched:
                R.check(
                    any(p["name"] == "metrics" for p in s["spec"]["ports"]),
                    f"[{L}] {s['metadata']['name']} has a metrics port",
                )


@combo(
    "cpu-only",
    {"encoder": {"gpu": False}, "decoder": {"gpu": False, "tp": 2}, "modelCache": {"enabled": False},
     "model": {"id": "/models/af-next", "dtype": "f32"}},
)
def _cpu(r: Rendered) -> None:
    L = "cpu-only"
    for w, c in r.afnext_containers():
        name = w["metadata"]["name"]
        R.check(gpus(c) == 0, f"[{L}] {name}: no GPU")
        R.check(not c["image"].endswith("-cuda"), f"[{L}] {name}: CPU image")
        for a in afnext_argvs(c):
            if a[1] != "router":
                R.check(flag_values(a, "--device") == ["cpu"], f"[{L}] {name}: {a[1]} --device=cpu")
        R.check(not w["spec"]["template"]["spec"].get("initContainers"), f"[{L}] {name}: no prefetch for a path")
        vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        R.check("emptyDir" in vols["model-cache"], f"[{L}] {name}: model cache is an emptyDir")
    R.check(not r.kinds("PersistentVolumeClaim"), f"[{L}] no PVC")


# Values that must be refused: by the schema (unknown keys, wrong types) or by the templates' checks.
REFUSED: list[tuple[str, dict, str]] = [
    ("unknown top-level key", {"bogus": 1}, "additional properties"),
    ("unknown nested key", {"router": {"replicaz": 3}}, "additional properties"),
    ("unknown deep key", {"decoder": {"pdb": {"minAvailable": 1}}}, "additional properties"),
    ("unknown key in resources", {"decoder": {"resources": {"request": {"cpu": "1"}}}}, "additional properties"),
    ("unknown key in a toleration", {"encoder": {"tolerations": [{"key": "a", "operater": "Exists"}]}}, "additional"),
    ("mistyped tp", {"decoder": {"tp": "4"}}, "want integer"),
    ("tp 0", {"decoder": {"tp": 0}}, "minimum"),
    ("bad dtype", {"model": {"dtype": "fp8"}}, "dtype"),
    ("non-string env value", {"commonEnv": {"X": 1}}, "want string"),
    ("external etcd without endpoints", {"etcd": {"enabled": False}}, "etcd.endpoints"),
    ("TLS without a secret", {"tls": {"enabled": True}}, "tls.secretName"),
    ("API keys without keys", {"apiKeys": {"enabled": True}}, "apiKeys.existingSecret"),
]


# --------------------------------------------------------------------------------------------------------------
# Chart checks
# --------------------------------------------------------------------------------------------------------------


def walk_keys(tree: Any, path: tuple[str, ...] = ()) -> Iterable[tuple[str, ...]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield path + (str(k),)
            yield from walk_keys(v, path + (str(k),))


def walk_schema(node: dict, path: str = "$") -> Iterable[tuple[str, dict]]:
    yield path, node
    for k, v in node.get("properties", {}).items():
        yield from walk_schema(v, f"{path}.{k}")
    if isinstance(node.get("items"), dict):
        yield from walk_schema(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk_schema(node["additionalProperties"], f"{path}.*")


def check_values_and_schema() -> None:
    R.section("values.yaml and values.schema.json")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = key_docs(CHART / "values.yaml")
    keys = list(walk_keys(values))
    undocumented = [".".join(k) for k in keys if not docs.get(k)]
    R.check(not undocumented, "every values.yaml key has a comment", str(undocumented))
    print(f"  {len(keys)} keys in values.yaml, all documented" if not undocumented else "")
    gen = subprocess.run([sys.executable, str(HERE / "gen_schema.py"), "--check"], capture_output=True, text=True)
    R.check(gen.returncode == 0, "values.schema.json is what gen_schema.py generates", gen.stdout + gen.stderr)
    schema = json.loads((CHART / "values.schema.json").read_text())
    objects = 0
    for path, node in walk_schema(schema):
        t = node.get("type")
        if t == "object" or (isinstance(t, list) and "object" in t):
            objects += 1
            ap = node.get("additionalProperties")
            R.check(
                ap is False or (isinstance(ap, dict) and "type" in ap),
                f"schema {path}: closed (additionalProperties false) or a typed map",
            )
        elif path != "$":
            R.check(t is not None or "enum" in node, f"schema {path}: typed")
    # Every key of values.yaml is a property in the schema (not only allowed by a map).
    def in_schema(key: tuple[str, ...]) -> bool:
        node = schema
        for k in key:
            if k in node.get("properties", {}):
                node = node["properties"][k]
            elif isinstance(node.get("additionalProperties"), dict):
                node = node["additionalProperties"]
            else:
                return False
        return True

    missing = [".".join(k) for k in keys if not in_schema(k)]
    R.check(not missing, "every values.yaml key is in the schema", str(missing))
    print(f"  schema: {objects} object levels, each closed or a typed map")
    with helm.Chart.load(str(CHART)) as chart:
        try:
            chart.validate_schema({})
            R.check(True, "")
        except helm.HelmError as e:
            R.check(False, "defaults pass the schema", str(e))
        meta = chart.metadata
    R.check(meta.get("apiVersion") == "v2", "Chart.yaml apiVersion v2", str(meta.get("apiVersion")))


def check_lint() -> None:
    R.section(f"helm lint (Helm SDK {helm.helm_sdk_version()} via helm-python-sdk {helm.__version__})")
    for label, values in [("defaults", None)] + [(label, v) for label, v, _ in COMBOS if v]:
        rep = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
        bad = [m for m in rep.get("messages", []) if m["severity"] >= 2]
        R.check(not bad and not rep.get("errors"), f"lint [{label}]", json.dumps(bad or rep.get("errors")))
    print(f"  linted {len(COMBOS)} values sets (strict, kube {KUBE_VERSION})")


def check_render() -> None:
    R.section(f"render + validate against Kubernetes {KUBE_VERSION} schemas (skipped CRD kinds: ServiceMonitor)")
    for label, values, fn in COMBOS:
        before = len(R.failures)
        try:
            r = render(values)
        except helm.HelmError as e:
            R.check(False, f"[{label}] renders", str(e))
            continue
        validate_kube(r, label)
        common_checks(label, r, values)
        try:
            fn(r)
        except (KeyError, AssertionError, TypeError, IndexError, ValueError) as e:
            R.check(False, f"[{label}] checks ran", f"{type(e).__name__}: {e}")
        kinds: dict[str, int] = {}
        for d in r.docs:
            kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
        status = "ok" if len(R.failures) == before else "FAILED"
        print(f"  [{label}] {status}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    R.section("values the chart must refuse")
    for what, values, needle in REFUSED:
        try:
            render(values)
            R.check(False, f"refused: {what}", "rendered without error")
        except helm.HelmError as e:
            R.check(needle in str(e), f"refused: {what}", f"error does not mention {needle!r}: {e}")
            print(f"  refused ({what}): {str(e).strip().splitlines()[-1].strip()[:110]}")



def main() -> int:
    t0 = time.monotonic()
    print(f"afnext chart check: helm-python-sdk {helm.__version__} (Helm {helm.helm_sdk_version()}), "
          f"kubernetes-validate {getattr(kubernetes_validate, '__version__', '?')}, "
          f"Kubernetes {KUBE_VERSION}, binary {AFNEXT_BIN}")
    if not Path(AFNEXT_BIN).exists():
        R.check(False, f"{AFNEXT_BIN} exists (build it, or set AFNEXT_BIN)")
    check_values_and_schema()
    check_lint()
    check_render()
    stages = check_dockerfile()
    check_compose(stages)
    check_dashboard()
    dt = time.monotonic() - t0
    print(f"== {R.passed} passed, {len(R.failures)} failed ({dt:.1f} s)")
    for f in R.failures:
        print(f"FAILED: {f}")
    return 1 if R.failures else 0


if __name__ == "__main__":
    sys.exit(main())
