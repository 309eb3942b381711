#!/usr/bin/env python3
"""Checks the deploy templates against the platform rules a first deployment trips over, the
ones that can be checked without Azure (kubernetes-validate checks the schema, not these).

Kubernetes (deploy/k8s/*.yaml):
  - readiness never gates the tunnel: every Service exposing the tunnel port publishes not-ready
    addresses, and a PodDisruptionBudget over edges lets not-ready edges be evicted;
  - the tunnel LoadBalancer has its own DNS label, and the edge's certificate carries that name;
  - every image names its registry (an unqualified name pulls from Docker Hub);
  - no Secret is defined (applying the file would overwrite the real one);
  - every pod has the RuntimeDefault seccomp profile and every container drops privileges;
  - every Deployment's grace period is longer than the drain timeout it gives its process;
  - the edge reads a configuration mounted from a ConfigMap.

Exits non-zero with one line per broken rule. Needs PyYAML (installed with kubernetes-validate).
"""

import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent
TUNNEL_PORT = 4433
# What the binaries default to when the environment does not say (30 s, relay-*/src/config.rs).
DEFAULT_DRAIN_SECONDS = 30

errors = []


def fail(where, message):
    errors.append(f"{where}: {message}")


def seconds(text):
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", str(text).strip())
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2)
    return {"ms": value / 1000, "s": value, "m": value * 60, "h": value * 3600}[unit]


def pod_spec(doc):
    kind = doc.get("kind")
    if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return doc["spec"]["template"]["spec"]
    return None


def check_pod(where, spec):
    pod_security = spec.get("securityContext") or {}
    pod_seccomp = (pod_security.get("seccompProfile") or {}).get("type")
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        name = f"{where} container {container['name']}"
        image = container.get("image", "")
        registry = image.split("/")[0] if "/" in image else ""
        if not ("." in registry or ":" in registry or registry == "localhost"):
            fail(name, f"image {image!r} names no registry (it would be pulled from Docker Hub)")
        security = container.get("securityContext") or {}
        seccomp = (security.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp != "RuntimeDefault":
            fail(name, "no RuntimeDefault seccomp profile (Pod Security Standard 'restricted')")
        if security.get("allowPrivilegeEscalation") is not False:
            fail(name, "allowPrivilegeEscalation is not false")
        if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
            fail(name, "does not drop ALL capabilities")
        if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
            fail(name, "runAsNonRoot is not set")


def drain_seconds(container):
    for env in container.get("env", []):
        if env.get("name") in ("RELAY_EDGE_DRAIN_TIMEOUT", "RELAY_AGENT_DRAIN_TIMEOUT"):
            return seconds(env.get("value"))
    if "acs-relay" in container.get("image", ""):
        return DEFAULT_DRAIN_SECONDS
    return None


def check_kubernetes():
    docs = []
    for path in sorted((ROOT / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    config_maps = {d["metadata"]["name"] for _, d in docs if d.get("kind") == "ConfigMap"}
    init_names = []
    for file, doc in docs:
        where = f"k8s/{file} {doc.get('kind')} {doc['metadata']['name']}"
        kind = doc.get("kind")
        if kind == "Secret":
            fail(where, "defines a Secret: applying the file again would overwrite the real one")
        if kind == "Service":
            spec = doc["spec"]
            if any(p.get("port") == TUNNEL_PORT for p in spec.get("ports", [])):
                if spec.get("publishNotReadyAddresses") is not True:
                    fail(where, "serves the tunnel but publishes only ready edges (readiness needs an agent)")
                if spec.get("type") == "LoadBalancer":
                    label = (doc["metadata"].get("annotations") or {}).get(
                        "service.beta.kubernetes.io/azure-dns-label-name"
                    )
                    if not label:
                        fail(where, "the tunnel LoadBalancer has no DNS label of its own")
                    else:
                        init_names.append((where, label))
        if kind == "PodDisruptionBudget" and "edge" in doc["metadata"]["name"]:
            if doc["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
                fail(where, "not-ready edges (no agent yet) could never be evicted: set unhealthyPodEvictionPolicy")
        spec = pod_spec(doc)
        if spec is None:
            continue
        check_pod(where, spec)
        if kind == "Deployment":
            grace = spec.get("terminationGracePeriodSeconds", 30)
            for container in spec["containers"]:
                drain = drain_seconds(container)
                if drain is not None and grace <= drain:
                    fail(where, f"grace period {grace} s does not outlast {container['name']}'s drain of {drain} s")
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                if "acs-relay-edge" in container.get("image", ""):
                    config = env.get("RELAY_EDGE_CONFIG")
                    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
                    volumes = {v["name"]: v for v in spec.get("volumes", [])}
                    mounted = any(
                        config and config.startswith(path.rstrip("/") + "/")
                        and (volumes.get(name, {}).get("configMap") or {}).get("name") in config_maps
                        for name, path in mounts.items()
                    )
                    if not mounted:
                        fail(where, "the edge reads no configuration mounted from a ConfigMap (RELAY_EDGE_CONFIG)")
        if kind == "Job":
            args = [a for c in spec["containers"] for a in c.get("args", [])]
            names = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--name"]
            init_names.append((where, names))
    labels = [label for _, label in init_names if isinstance(label, str)]
    certificate = [n for _, names in init_names if isinstance(names, list) for n in names]
    for label in labels:
        if not any(n.startswith(label + ".") for n in certificate):
            fail("k8s", f"the tunnel's DNS label {label!r} is not among the certificate's names (init Job --name)")


check_kubernetes()
for line in errors:
    print(line)
if errors:
    sys.exit(1)
print("deploy rules: ok")
