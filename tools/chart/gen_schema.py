"""Writes helm/afnext/values.schema.json: the types of every value of the chart, with the descriptions taken
from the comments of values.yaml. Every object the chart defines is closed ("additionalProperties": false);
free-form maps (annotations, node selectors, env, resource quantities) type their values instead.

    python tools/chart/gen_schema.py          # rewrite the schema
    python tools/chart/gen_schema.py --check  # exit 1 if the committed schema differs (check.py runs this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from values_doc import key_docs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "afnext"
SCHEMA = CHART / "values.schema.json"

STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT = {"type": "integer"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
POS = {"type": "integer", "minimum": 1}
NONNEG = {"type": "integer", "minimum": 0}
QUANTITY = {"type": ["string", "integer", "number"]}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
PULL = {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]}
DURATION = {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}


def obj(props: dict, required: bool = True) -> dict:
    o = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        o["required"] = list(props)
    return o


def arr(items: dict) -> dict:
    return {"type": "array", "items": items}


RESOURCES = obj(
    {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
    },
    required=False,
)
TOLERATIONS = arr(
    obj(
        {
            "key": STR,
            "operator": {"type": "string", "enum": ["Exists", "Equal"]},
            "value": STR,
            "effect": {"type": "string", "enum": ["", "NoSchedule", "PreferNoSchedule", "NoExecute"]},
            "tolerationSeconds": INT,
        },
        required=False,
    )
)
KEY_REF = obj({"name": STR, "key": STR, "optional": BOOL}, required=False)
ENV = arr(
    {
        **obj(
            {
                "name": STR,
                "value": STR,
                "valueFrom": obj(
                    {
                        "secretKeyRef": KEY_REF,
                        "configMapKeyRef": KEY_REF,
                        "fieldRef": obj({"apiVersion": STR, "fieldPath": STR}, required=False),
                        "resourceFieldRef": obj(
                            {"containerName": STR, "resource": STR, "divisor": QUANTITY}, required=False
                        ),
                    },
                    required=False,
                ),
            },
            required=False,
        ),
        "required": ["name"],
    }
)
HPA_COMMON = {
    "enabled": BOOL,
    "minReplicas": POS,
    "maxReplicas": POS,
}
PROBE = obj({"periodSeconds": POS, "failureThreshold": POS, "timeoutSeconds": POS})
PDB_MIN = obj({"enabled": BOOL, "minAvailable": {"type": ["integer", "string"]}})
SCHEDULING = {"podAnnotations": STRMAP, "nodeSelector": STRMAP, "tolerations": TOLERATIONS}

TYPES = obj(
    {
        "nameOverride": STR,
        "fullnameOverride": STR,
        "image": obj(
            {
                "repository": {"type": "string", "minLength": 1},
                "tag": STR,
                "cudaTagSuffix": STR,
                "pullPolicy": PULL,
                "pullSecrets": arr(STR),
            }
        ),
        "model": obj(
            {
                "id": {"type": "string", "minLength": 1},
                "revision": STR,
                "dtype": {"type": "string", "enum": ["f32", "bf16", "f16"]},
                "hubOffline": BOOL,
                "hfTokenSecret": obj({"name": STR, "key": {"type": "string", "minLength": 1}}),
                "prefetch": obj(
                    {
                        "enabled": BOOL,
                        "image": {"type": "string", "minLength": 1},
                        "huggingfaceHubVersion": {"type": "string", "minLength": 1},
                        "allowPatterns": {"type": "array", "items": STR, "minItems": 1},
                        "resources": RESOURCES,
                    }
                ),
            }
        ),
        "modelCache": obj(
            {
                "enabled": BOOL,
                "existingClaim": STR,
                "storageClassName": STR,
                "accessModes": arr(
                    {"type": "string", "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}
                ),
                "size": {"type": "string", "minLength": 1},
                "mountPath": {"type": "string", "pattern": "^/"},
                "keep": BOOL,
            }
        ),
        "cluster": obj({"prefix": {"type": "string", "pattern": "^/"}, "leaseTtlSeconds": POS}),
        "etcd": obj(
            {
                "enabled": BOOL,
                "endpoints": arr({"type": "string", "pattern": "^https?://"}),
                "image": obj({"repository": STR, "tag": STR, "pullPolicy": PULL}),
                "clientPort": PORT,
                "persistence": obj({"enabled": BOOL, "storageClassName": STR, "size": STR}),
                "resources": RESOURCES,
                "nodeSelector": STRMAP,
                "tolerations": TOLERATIONS,
            }
        ),
        "tls": obj({"enabled": BOOL, "secretName": STR, "mutual": BOOL, "serverName": STR}),
        "apiKeys": obj(
            {
                "enabled": BOOL,
                "existingSecret": STR,
                "secretKey": {"type": "string", "pattern": "^[-._a-zA-Z0-9]+$"},
                "keys": arr({"type": "string", "pattern": "^[^\\s]+$"}),
            }
        ),
        "commonEnv": {
            "type": "object",
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
            "additionalProperties": STR,
        },
        "podSecurityContext": obj(
            {"runAsNonRoot": BOOL, "runAsUser": NONNEG, "runAsGroup": NONNEG, "fsGroup": NONNEG},
            required=False,
        ),
        "probes": obj({"startup": PROBE, "liveness": PROBE, "readiness": PROBE}),
        "metrics": obj(
            {
                "port": PORT,
                "podAnnotations": BOOL,
                "serviceMonitor": obj(
                    {"enabled": BOOL, "interval": DURATION, "scrapeTimeout": DURATION, "labels": STRMAP}
                ),
            }
        ),
        "router": obj(
            {
                "replicas": NONNEG,
                "port": PORT,
                "service": obj(
                    {
                        "type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "port": PORT,
                        "sessionAffinity": {"type": "string", "enum": ["None", "ClientIP"]},
                        "annotations": STRMAP,
                    }
                ),
                "gracePeriodSeconds": NONNEG,
                "maxMessageMib": POS,
                "maxUploadMib": POS,
                "uploadStoreMib": POS,
                "windowTimeoutSeconds": POS,
                "windowAttempts": POS,
                "decoderAttempts": POS,
                "healthIntervalMs": POS,
                "extraArgs": arr(STR),
                "extraEnv": ENV,
                "resources": RESOURCES,
                "autoscaling": obj({**HPA_COMMON, "targetCPUUtilizationPercentage": POS}),
                "pdb": PDB_MIN,
                **SCHEDULING,
            }
        ),
        "encoder": obj(
            {
                "replicas": NONNEG,
                "gpu": BOOL,
                "port": PORT,
                "batch": POS,
                "maxQueuedWindows": POS,
                "pushTimeoutSeconds": POS,
                "terminationGracePeriodSeconds": NONNEG,
                "extraArgs": arr(STR),
                "extraEnv": ENV,
                "resources": RESOURCES,
                "autoscaling": obj(
                    {
                        **HPA_COMMON,
                        "targetCPUUtilizationPercentage": NONNEG,
                        "queueDepth": obj({"enabled": BOOL, "targetAverageValue": {"type": "string", "minLength": 1}}),
                    }
                ),
                "pdb": PDB_MIN,
                **SCHEDULING,
            }
        ),
        "decoder": obj(
            {
                "groups": NONNEG,
                "tp": {"type": "integer", "minimum": 1, "maximum": 8},
                "gpu": BOOL,
                "port": PORT,
                "groupPort": PORT,
                "collectiveTimeoutSeconds": POS,
                "joinTimeoutSeconds": POS,
                "gracePeriodSeconds": NONNEG,
                "kvCacheMib": POS,
                "blockSize": POS,
                "maxBatchTokens": POS,
                "maxRunning": POS,
                "maxWaiting": NONNEG,
                "prefillChunk": POS,
                "embeddingCacheMib": NONNEG,
                "shmSizeLimit": {"type": "string", "minLength": 1},
                "ncclEnv": {
                    "type": "object",
                    "propertyNames": {"pattern": "^NCCL_[A-Z0-9_]+$"},
                    "additionalProperties": STR,
                },
                "extraArgs": arr(STR),
                "extraEnv": ENV,
                "resources": RESOURCES,
                "pdb": obj({"enabled": BOOL, "maxUnavailable": {"type": ["integer", "string"]}}),
                **SCHEDULING,
            }
        ),
    }
)


def describe(node: dict, docs: dict, path: tuple[str, ...] = ()) -> dict:
    """A copy of node with each property's description from values.yaml."""
    node = dict(node)
    if "properties" in node:
        props = {}
        for k, v in node["properties"].items():
            v = describe(v, docs, path + (k,))
            if docs.get(path + (k,)):
                v = {"description": docs[path + (k,)], **v}
            props[k] = v
        node["properties"] = props
    return node


def schema() -> dict:
    docs = key_docs(CHART / "values.yaml")
    return {
        "$schema": "https://json-schema.org/draft-07/schema#",
        "title": "afnext chart values",
        **describe(TYPES, docs),
    }


def main() -> int:
    text = json.dumps(schema(), indent=2) + "\n"
    if "--check" in sys.argv[1:]:
        if not SCHEMA.exists() or SCHEMA.read_text() != text:
            print(f"{SCHEMA.relative_to(ROOT)} is out of date: run python tools/chart/gen_schema.py")
            return 1
        return 0
    SCHEMA.write_text(text)
    print(f"wrote {SCHEMA.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
