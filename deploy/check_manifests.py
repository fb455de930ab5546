#!/usr/bin/env python3
"""Check the deploy/ YAML files: they parse, and the Kubernetes manifests keep their shape
(single replica with its volume; two replicas with the backend URLs from a Secret, readiness on
/readyz and liveness on /healthz). Run by .ci/run; needs PyYAML."""
import sys
from pathlib import Path

import yaml

here = Path(__file__).resolve().parent


def docs(name):
    with open(here / name) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def one(ds, kind):
    found = [d for d in ds if d["kind"] == kind]
    assert len(found) == 1, f"one {kind}: {len(found)}"
    return found[0]


def probes(workload, name):
    c = workload["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", name
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", name
    return c


for f in sorted(here.glob("*.yaml")):
    docs(f.name)
    print(f"{f.name}: parses")

single = docs("kubernetes.yaml")
d = one(single, "Deployment")
assert d["spec"]["replicas"] == 1
probes(d, "kubernetes.yaml")
one(single, "PersistentVolumeClaim")

replicated = docs("kubernetes.replicas.yaml")
s = one(replicated, "StatefulSet")
assert s["spec"]["replicas"] == 2
c = probes(s, "kubernetes.replicas.yaml")
env = {e["name"]: e for e in c["env"]}
for var in ("IMAGEGATE_REDIS_URL", "IMAGEGATE_POSTGRES_URL", "OPENAI_API_KEY"):
    assert "secretKeyRef" in env[var]["valueFrom"], var
toml = one(replicated, "ConfigMap")["data"]["imagegate.toml"]
assert 'backend = "redis"' in toml and 'backend = "postgres"' in toml
assert "postgres://" not in toml and "redis://" not in toml, "URLs belong in the Secret"
services = [d for d in replicated if d["kind"] == "Service"]
assert any(x["spec"].get("clusterIP") == "None" for x in services), "a headless service"
assert s["spec"]["serviceName"] in [x["metadata"]["name"] for x in services]
print("kubernetes manifests: ok")
sys.exit(0)
