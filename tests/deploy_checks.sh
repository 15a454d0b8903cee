#!/usr/bin/env bash
# Validates every deployment artefact under deploy/, offline: no cluster, no container engine,
# no running systemd needed. Called by tests/run.sh; runs on its own too:
#
#   bash tests/deploy_checks.sh
#
# Needs: promtool (Debian package prometheus), systemd-analyze and systemd-sysusers (systemd),
# openssl, python3 (3.11+, with venv), cargo (or SEG_BIN=path to a built seg). Python packages (kubernetes-validate, which ships
# the Kubernetes JSON schemas, and dockerfile, BuildKit's own Dockerfile parser) are installed
# on first use into target/deploy-checks/venv from PyPI.
#
# Every check prints what it validated; a failed check does not stop the others. The last line
# is "deploy-checks: N passed, M failed"; the exit status is 1 when anything failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

VENV=$ROOT/target/deploy-checks/venv
PY_PACKAGES=(kubernetes-validate==1.37.0 dockerfile==3.4.0)
K8S_VERSIONS=(1.25.0 1.37.0) # the oldest and the newest schemas kubernetes-validate ships
# SEG_BIN=path uses an existing seg binary instead of building target/release/seg.
BUILD_SEG=1
if [[ -n "${SEG_BIN:-}" ]]; then
    BUILD_SEG=0
else
    SEG_BIN=$ROOT/target/release/seg
fi

PASSED=()
FAILED=()

# check NAME COMMAND...: runs one check, prints its output indented, records the result.
check() {
    local name=$1 rc=0 out
    shift
    echo
    echo "--- $name"
    out=$("$@" 2>&1) || rc=$?
    if [[ -n "$out" ]]; then
        sed 's/^/    /' <<<"$out"
    fi
    if ((rc == 0)); then
        echo "    ok"
        PASSED+=("$name")
    else
        echo "    FAILED (exit $rc)"
        FAILED+=("$name")
    fi
}

need() {
    local tool=$1 hint=$2
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "$tool not found: $hint" >&2
        return 1
    fi
}

# --- prerequisites ------------------------------------------------------------------------

prerequisites() {
    local rc=0
    need promtool "apt-get install -y --no-install-recommends prometheus" || rc=1
    need systemd-analyze "apt-get install -y --no-install-recommends systemd" || rc=1
    need systemd-sysusers "apt-get install -y --no-install-recommends systemd" || rc=1
    need openssl "apt-get install -y --no-install-recommends openssl" || rc=1
    need python3 "apt-get install -y --no-install-recommends python3 python3-venv" || rc=1
    need cargo "install a Rust toolchain (rustup)" || rc=1
    ((rc == 0)) || return 1
    if ! "$VENV/bin/python" -c 'import kubernetes_validate, dockerfile, yaml, jsonschema' 2>/dev/null; then
        echo "installing ${PY_PACKAGES[*]} into $VENV"
        rm -rf "$VENV"
        python3 -m venv "$VENV" || {
            echo "python3 -m venv failed: apt-get install -y python3-venv" >&2
            return 1
        }
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}" || return 1
    fi
    "$VENV/bin/python" -c 'import sys, tomllib; print("python", sys.version.split()[0])' || {
        echo "python 3.11 or newer is needed (tomllib)" >&2
        return 1
    }
    echo "promtool: $(promtool --version 2>&1 | head -n1)"
    echo "systemd: $(systemd-analyze --version | head -n1)"
    echo "kubernetes-validate: $("$VENV/bin/kubernetes-validate" --version)"
    # The real binary: systemd-analyze verify wants ExecStart to exist, check-config runs it.
    if ((BUILD_SEG)); then
        cargo build --release --quiet --bin seg || return 1
    fi
    echo "seg: $("$SEG_BIN" --version)"
}

PY() { "$VENV/bin/python" - "$@"; }

# --- Prometheus ---------------------------------------------------------------------------

prometheus_rules() {
    promtool check rules deploy/prometheus/seg-alerts.yml &&
        promtool test rules deploy/prometheus/seg-alerts.test.yml
}

# Each alert: summary, description, a runbook_url whose section exists in docs/operations.md,
# a severity; and at least one promtool test case where it fires and one where it does not.
alert_coverage() {
    PY <<'EOF'
import re, sys, yaml
rules = yaml.safe_load(open("deploy/prometheus/seg-alerts.yml"))
tests = yaml.safe_load(open("deploy/prometheus/seg-alerts.test.yml"))
doc = open("docs/operations.md").read()

def anchor(heading):  # GitHub's heading anchors
    a = heading.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")

anchors = {anchor(h) for h in re.findall(r"^#+\s+(.*)$", doc, re.M)}
fires, quiet = set(), set()
for case in tests["tests"]:
    for t in case.get("alert_rule_test", []):
        (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
problems = []
alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
for r in alerts:
    name, ann = r["alert"], r.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        if not ann.get(key):
            problems.append(f"{name}: no {key} annotation")
    if r.get("labels", {}).get("severity") not in ("warning", "critical"):
        problems.append(f"{name}: severity must be warning or critical")
    url = ann.get("runbook_url", "")
    if not url.startswith("docs/operations.md#") or url.split("#", 1)[1] not in anchors:
        problems.append(f"{name}: runbook_url {url!r} names no section of docs/operations.md")
    if name not in fires:
        problems.append(f"{name}: no promtool test case where it fires")
    if name not in quiet:
        problems.append(f"{name}: no promtool test case where it stays quiet")
print(f"{len(alerts)} alerts, each with summary, description, severity, a runbook section,")
print("and promtool cases where it fires and where it stays quiet")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
}

# The Grafana dashboard: JSON, structure, and every query valid PromQL (parsed by promtool as
# recording rules, with Grafana's variables replaced).
dashboard() {
    PY "$WORK/dashboard-rules.yml" <<'EOF' && promtool check rules "$WORK/dashboard-rules.yml"
import json, sys, yaml
path = "deploy/prometheus/grafana/seg-dashboard.json"
d = json.load(open(path))
problems = []
for key in ("title", "uid", "panels", "templating", "schemaVersion"):
    if key not in d:
        problems.append(f"no top-level {key}")
panels = d["panels"]
ids = [p.get("id") for p in panels]
if len(ids) != len(set(ids)):
    problems.append("panel ids are not unique")
variables = {v["name"] for v in d["templating"]["list"]}
for needed in ("datasource", "job", "instance"):
    if needed not in variables:
        problems.append(f"no ${needed} variable")
exprs = []
for p in panels:
    if p["type"] == "row":
        continue
    if "gridPos" not in p or not p.get("targets"):
        problems.append(f"panel {p.get('title')!r}: no gridPos or no targets")
    if p.get("datasource", {}).get("uid") != "${datasource}":
        problems.append(f"panel {p.get('title')!r}: datasource is not ${{datasource}}")
    for t in p.get("targets", []):
        if not t.get("expr") or not t.get("refId"):
            problems.append(f"panel {p.get('title')!r}: a target without expr or refId")
        else:
            exprs.append((p["title"], t["expr"]))
titles = " | ".join(p["title"] for p in panels).lower()
for wanted in ("requests by command", "requests by status class", "latency", "handshakes",
               "cache hit ratio", "directory search latency", "long polls in flight"):
    if wanted not in titles:
        problems.append(f"no panel about {wanted!r}")
substitutions = {"$__rate_interval": "1m", "$job": "seg", "$instance": ".+", "${datasource}": "x"}
rules = []
for i, (title, expr) in enumerate(exprs):
    for k, v in substitutions.items():
        expr = expr.replace(k, v)
    rules.append({"record": f"dashboard:panel_query_{i}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[1], "w"))
print(f"{path}: {len(panels)} panels, {len(exprs)} queries; checking the queries as PromQL:")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
}

# Every seg_* metric an alert or a panel uses is defined in src/metrics.rs (histograms may add
# _bucket, _sum, _count), so a renamed metric breaks CI rather than a dashboard.
metric_names() {
    PY <<'EOF'
import re, sys
source = open("src/metrics.rs").read()
defined = set(re.findall(r'"([a-z][a-z0-9_]*)"', source))
files = ["deploy/prometheus/seg-alerts.yml", "deploy/prometheus/grafana/seg-dashboard.json"]
problems, used = [], set()
for f in files:
    for name in set(re.findall(r"\bseg_[a-z0-9_]+", open(f).read())):
        used.add(name)
        base = name[len("seg_"):]
        candidates = {base} | {base[: -len(s)] for s in ("_bucket", "_sum", "_count") if base.endswith(s)}
        if not candidates & defined:
            problems.append(f"{f}: {name} is not defined in src/metrics.rs")
print(f"{len(used)} seg_* metric names used by alerts and dashboard, all defined in src/metrics.rs:")
print("  " + ", ".join(sorted(used)))
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
}

# --- systemd ------------------------------------------------------------------------------

systemd_unit() {
    local unit=deploy/systemd/seg.service dir=$WORK/systemd out rc=0 directive
    mkdir -p "$dir"
    # verify needs the ExecStart binary to exist: point the copy at the one just built.
    sed "s#/usr/local/bin/seg#$SEG_BIN#g" "$unit" >"$dir/seg.service"
    out=$(systemd-analyze verify "$dir/seg.service" 2>&1) || rc=$?
    if ((rc != 0)) || [[ -n "$out" ]]; then
        echo "systemd-analyze verify (exit $rc) is not clean:"
        echo "$out"
        return 1
    fi
    echo "systemd-analyze verify: clean (ExecStart pointed at $SEG_BIN)"
    for directive in 'User=seg' 'Group=seg' 'AmbientCapabilities=CAP_NET_BIND_SERVICE' \
        'CapabilityBoundingSet=CAP_NET_BIND_SERVICE' 'NoNewPrivileges=yes' 'ProtectSystem=strict' \
        'ReadWritePaths=/var/lib/seg' 'ExecReload=/bin/kill -HUP $MAINPID' 'KillSignal=SIGTERM'; do
        if ! grep -qxF "$directive" "$unit"; then
            echo "missing: $directive"
            return 1
        fi
    done
    echo "directives present: dedicated user, CAP_NET_BIND_SERVICE only, NoNewPrivileges,"
    echo "  ProtectSystem=strict, ReadWritePaths=/var/lib/seg, ExecReload with SIGHUP"
    # Exposure 0-100 (shown divided by 10): at most 1.5 (the unit scores 1.4), so a loosened
    # setting fails here.
    out=$(systemd-analyze security --offline=yes --threshold=15 "$dir/seg.service" 2>&1) || {
        echo "systemd-analyze security: exposure above 1.5:"
        echo "$out" | grep -E '✗|Overall'
        return 1
    }
    echo "systemd-analyze security: $(grep -o 'Overall exposure level.*' <<<"$out")"
    # The dedicated user comes from sysusers.d: create it in a throwaway root.
    mkdir -p "$dir/root/etc"
    systemd-sysusers --root="$dir/root" "$ROOT/deploy/systemd/seg.sysusers" || return 1
    if ! grep -q '^seg:x:[0-9]*:[0-9]*:.*:/var/lib/seg:/usr/sbin/nologin$' "$dir/root/etc/passwd"; then
        echo "deploy/systemd/seg.sysusers did not create a seg system user without a login:"
        cat "$dir/root/etc/passwd"
        return 1
    fi
    echo "deploy/systemd/seg.sysusers: $(grep '^seg:' "$dir/root/etc/passwd")"
}

# --- Kubernetes ---------------------------------------------------------------------------

kubernetes_schemas() {
    local f version out rc=0 kind
    for version in "${K8S_VERSIONS[@]}"; do
        for f in deploy/kubernetes/*.yaml deploy/kubernetes/fleet-store/*.yaml; do
            kind=$(sed -n 's/^kind: *//p' "$f" | head -n1)
            case $kind in
            Kustomization | ServiceMonitor) continue ;; # not built-in kinds: see below
            esac
            out=$("$VENV/bin/kubernetes-validate" --strict -k "$version" --quiet "$f" 2>&1) || rc=1
            # kubernetes-validate only warns about a kind it has no schema for: that is a failure.
            if [[ -n "$out" ]]; then
                echo "$out"
                rc=1
            fi
        done
        echo "Kubernetes $version schemas (strict: no unknown fields): $(cd deploy/kubernetes && ls *.yaml fleet-store/*.yaml | grep -vE '(^|/)kustomization.yaml$|servicemonitor.yaml' | tr '\n' ' ')"
    done
    return "$rc"
}

# The ServiceMonitor (a Prometheus Operator CRD, no schema in kubernetes-validate), the
# kustomization, and the references between objects that no schema can see.
kubernetes_structure() {
    PY "$SEG_BIN" "$WORK/k8s" <<'EOF'
import glob, json, os, re, shutil, subprocess, sys, tomllib
import jsonschema, yaml

seg_bin, work = sys.argv[1], sys.argv[2]
problems = []
def problem(text):
    problems.append(text)

docs = {}
for f in sorted(glob.glob("deploy/kubernetes/*.yaml")):
    for d in yaml.safe_load_all(open(f)):
        if d:
            docs.setdefault(d["kind"], []).append((os.path.basename(f), d))
def one(kind, name=None):
    found = [d for _, d in docs.get(kind, []) if name is None or d["metadata"]["name"] == name]
    if len(found) != 1:
        problem(f"expected one {kind}{' ' + name if name else ''}, found {len(found)}")
        return {}
    return found[0]

# kustomization.yaml lists every manifest of the folder.
kust = one("Kustomization")
files = {os.path.basename(f) for f in glob.glob("deploy/kubernetes/*.yaml")} - {"kustomization.yaml"}
if set(kust.get("resources", [])) != files:
    problem(f"kustomization.yaml resources {sorted(kust.get('resources', []))} != files {sorted(files)}")
print(f"kustomization.yaml lists all {len(files)} manifests")

# The fleet store (fleet-store/): its own kustomization, reachable from the seg pods only,
# and allowed by seg's egress policy.
store_docs = {}
for f in sorted(glob.glob("deploy/kubernetes/fleet-store/*.yaml")):
    for d in yaml.safe_load_all(open(f)):
        if d:
            store_docs.setdefault(d["kind"], []).append(d)
store_kust = store_docs["Kustomization"][0]
store_files = {os.path.basename(f) for f in glob.glob("deploy/kubernetes/fleet-store/*.yaml")} - {"kustomization.yaml"}
if set(store_kust.get("resources", [])) != store_files:
    problem(f"fleet-store/kustomization.yaml resources != files {sorted(store_files)}")
store = store_docs["StatefulSet"][0]
store_labels = store["spec"]["template"]["metadata"]["labels"]
store_ports = {p["name"]: p["containerPort"] for p in store["spec"]["template"]["spec"]["containers"][0]["ports"]}
store_svc = store_docs["Service"][0]
if any(store_labels.get(k) != v for k, v in store_svc["spec"]["selector"].items()):
    problem("fleet-store Service does not select the store's pods")
store_np = store_docs["NetworkPolicy"][0]
if any(store_labels.get(k) != v for k, v in store_np["spec"]["podSelector"]["matchLabels"].items()):
    problem("fleet-store NetworkPolicy does not select the store's pods")
for rule in store_np["spec"].get("ingress", []):
    for peer in rule.get("from", []):
        if peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") != "gateway" or "namespaceSelector" in peer or "ipBlock" in peer:
            problem("fleet-store NetworkPolicy admits more than the seg gateway pods")
if store_np["spec"].get("egress") != [] or "Egress" not in store_np["spec"].get("policyTypes", []):
    problem("fleet-store NetworkPolicy lets the store connect out")
egress_np = one("NetworkPolicy", "seg-egress")
if not any(
    any(peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "fleet-store" for peer in rule.get("to", []))
    and {p["port"] for p in rule.get("ports", [])} == {store_ports["store"]}
    for rule in egress_np["spec"]["egress"]
):
    problem("seg-egress does not let seg reach the fleet store's port")
print(f"fleet-store: Service and NetworkPolicy select the store; only seg gateway pods reach port {store_ports['store']}; seg-egress allows it")

# ServiceMonitor: structural schema of the fields the Prometheus Operator reads.
endpoint = {"type": "object", "additionalProperties": False, "properties": {
    "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
    "scheme": {"enum": ["http", "https"]}, "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
    "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}, "honorLabels": {"type": "boolean"},
    "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}},
    "required": ["port"]}
label_selector = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array"}}}
service_monitor_schema = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"}, "selector": label_selector,
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": endpoint},
                "targetLabels": {"type": "array"}, "podTargetLabels": {"type": "array"}}}}}
sm = one("ServiceMonitor")
try:
    jsonschema.validate(sm, service_monitor_schema)
    print("ServiceMonitor: a Prometheus Operator CRD, not in the Kubernetes schemas; validated against")
    print("  a structural schema of monitoring.coreos.com/v1 (selector, namespaceSelector, endpoints)")
except jsonschema.ValidationError as e:
    problem(f"ServiceMonitor: {e.message} at {list(e.absolute_path)}")

dep = one("Deployment", "seg")
pod = dep["spec"]["template"]
pod_labels = pod["metadata"]["labels"]
spec = pod["spec"]
container = spec["containers"][0]
ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())

if not selects(dep["spec"]["selector"]["matchLabels"], pod_labels):
    problem("Deployment selector does not match its pod labels")

services = {d["metadata"]["name"]: d for _, d in docs.get("Service", [])}
for name, svc in services.items():
    if not selects(svc["spec"]["selector"], pod_labels):
        problem(f"Service {name}: selector does not match the seg pods")
    for p in svc["spec"]["ports"]:
        if p["targetPort"] not in ports:
            problem(f"Service {name}: targetPort {p['targetPort']} is not a container port")
print(f"Services {sorted(services)}: select the seg pods, target named container ports {sorted(ports)}")

sel = sm.get("spec", {}).get("selector", {}).get("matchLabels", {})
scraped = [s for s in services.values() if selects(sel, s["metadata"]["labels"])]
if len(scraped) != 1:
    problem(f"ServiceMonitor selects {len(scraped)} Services, not one")
else:
    svc = scraped[0]
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for e in sm["spec"]["endpoints"]:
        if e["port"] not in svc_ports or svc_ports[e["port"]]["targetPort"] != "admin":
            problem(f"ServiceMonitor endpoint port {e['port']} is not the admin port of {svc['metadata']['name']}")
    if svc["metadata"]["namespace"] not in sm["spec"].get("namespaceSelector", {}).get("matchNames", []):
        problem("ServiceMonitor namespaceSelector misses the Service's namespace")
    job = svc["metadata"]["labels"].get(sm["spec"].get("jobLabel", ""), svc["metadata"]["name"])
    if job != "seg":
        problem(f"scraped series would carry job={job!r}; the alerts expect job=\"seg\"")
    print(f"ServiceMonitor scrapes Service {svc['metadata']['name']} port admin as job=\"{job}\"")

for kind in ("PodDisruptionBudget", "NetworkPolicy"):
    for _, d in docs.get(kind, []):
        s = d["spec"].get("selector") or d["spec"].get("podSelector")
        if not selects(s["matchLabels"], pod_labels):
            problem(f"{kind} {d['metadata']['name']}: selector does not match the seg pods")
hpa = one("HorizontalPodAutoscaler")
ref = hpa.get("spec", {}).get("scaleTargetRef", {})
if (ref.get("kind"), ref.get("name")) != ("Deployment", dep["metadata"]["name"]):
    problem("HorizontalPodAutoscaler does not scale the seg Deployment")
pdb = one("PodDisruptionBudget")
if hpa.get("spec", {}).get("minReplicas", 1) <= pdb.get("spec", {}).get("maxUnavailable", 0):
    problem("HPA minReplicas must exceed the PDB's maxUnavailable")
print("PodDisruptionBudget, NetworkPolicies and HPA point at the seg pods / Deployment")

# NetworkPolicy: the device port only from ipBlocks (the front), the admin port only from
# Prometheus pods and the seg gateway pods (seg devices across the fleet).
ingress = one("NetworkPolicy", "seg-ingress")
for rule in ingress.get("spec", {}).get("ingress", []):
    rule_ports = {p["port"] for p in rule.get("ports", [])}
    peers = rule.get("from", [])
    if not rule_ports or not peers:
        problem("seg-ingress: a rule without ports or without sources admits everything")
    if "eas" in rule_ports and not all("ipBlock" in p for p in peers):
        problem("seg-ingress: the device port admits more than the front's addresses")
    def prometheus_or_seg(peer):
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        return labels.get("app.kubernetes.io/name") == "prometheus" or (
            labels == {"app.kubernetes.io/name": "seg", "app.kubernetes.io/component": "gateway"}
            and "namespaceSelector" not in peer)
    if "admin" in rule_ports and not all(prometheus_or_seg(p) for p in peers):
        problem("seg-ingress: the admin port admits more than Prometheus and the seg pods")
    for p in rule_ports:
        if p not in ports:
            problem(f"seg-ingress: port {p} is not a container port")
print("NetworkPolicy seg-ingress: port eas from the front's ipBlock only, port admin from Prometheus and the seg pods only")

# Probes, drain, hardening.
probe = lambda name: container.get(name, {}).get("httpGet", {})
if (probe("readinessProbe").get("path"), probe("readinessProbe").get("port")) != ("/readyz", "admin"):
    problem("readinessProbe is not GET /readyz on the admin port")
if (probe("livenessProbe").get("path"), probe("livenessProbe").get("port")) != ("/healthz", "admin"):
    problem("livenessProbe is not GET /healthz on the admin port")
pre_stop = container.get("lifecycle", {}).get("preStop", {})
sleep = pre_stop.get("sleep", {}).get("seconds")
command = pre_stop.get("exec", {}).get("command", [])
if sleep is None and len(command) == 2 and command[0] == "sleep":
    sleep = int(command[1])
if sleep is None:
    problem("no preStop sleep: the endpoint must be removed before seg drains")
    sleep = 0
sc = container.get("securityContext", {})
if not (spec.get("securityContext", {}).get("runAsNonRoot") and sc.get("readOnlyRootFilesystem")
        and sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities", {}).get("drop") == ["ALL"]):
    problem("the container must run as non-root, read-only, without privilege escalation or capabilities")
for r in ("requests", "limits"):
    if not container.get("resources", {}).get(r, {}).get("memory"):
        problem(f"no memory {r}")

# The configuration: mounted as a directory (so updates arrive), valid for the real binary.
cm = one("ConfigMap", "seg-config")
text = cm["data"]["seg.toml"]
mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
volumes = {v["name"]: v for v in spec["volumes"]}
config_arg = container["args"][container["args"].index("--config") + 1]
config_volume = [n for n, v in volumes.items() if v.get("configMap", {}).get("name") == "seg-config"]
if not config_volume or os.path.join(mounts[config_volume[0]], "seg.toml") != config_arg:
    problem(f"--config {config_arg} is not seg.toml of the mounted seg-config ConfigMap")
if any("subPath" in m for m in container["volumeMounts"]):
    problem("a subPath mount never receives ConfigMap/Secret updates: seg could not reload them")
conf = tomllib.loads(text)
def paths(d, key=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from paths(v, key + (k,))
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, str) and x.startswith("/"):
                yield key + (k,), x
named = list(paths(conf))
for key, p in named:
    if not any(p.startswith(m.rstrip("/") + "/") for m in mounts.values()):
        problem(f"{'.'.join(key)} = {p} lies under no volume mount")
listen_port = int(conf["listen"]["address"].rsplit(":", 1)[1])
admin_port = int(conf["admin"]["address"].rsplit(":", 1)[1])
if (listen_port, admin_port) != (ports.get("eas"), ports.get("admin")):
    problem(f"seg.toml listens on {listen_port}/{admin_port}, the container ports are {ports}")
drain = 60  # listen.drain_window's default
m = re.match(r"^(\d+)(s|m)$", conf["listen"].get("drain_window", "60s"))
if m:
    drain = int(m.group(1)) * (60 if m.group(2) == "m" else 1)
grace = spec.get("terminationGracePeriodSeconds", 30)
if grace < sleep + drain + 10:
    problem(f"terminationGracePeriodSeconds {grace} < preStop {sleep} s + drain_window {drain} s + 10 s")
print(f"Deployment: /readyz and /healthz on port admin, preStop sleep {sleep} s, grace {grace} s"
      f" >= preStop + drain_window ({drain} s) + 10 s; non-root, read-only root, no capabilities")

# `seg check-config` on the ConfigMap's seg.toml, with the files it names replaced by
# stand-ins made by openssl (same names, under a temporary root).
standins = {"certificate": "server.pem", "private_key": "server.key", "client_ca": "ca.pem",
            "ca_file": "ca.pem", "crl_files": "ca.crl", "bind_password_file": "stand-in password\n",
            "session_ticket_key_file": os.urandom(32).hex() + "\n"}
root = os.path.join(work, "root")
for key, p in named:
    if key[-1] not in standins:
        problem(f"{'.'.join(key)}: no stand-in file known for this key")
        continue
    dst = root + p
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if standins[key[-1]].endswith("\n"):  # contents, not a file name
        open(dst, "w").write(standins[key[-1]])
    else:
        shutil.copy(os.path.join(work, "pki", standins[key[-1]]), dst)
config_path = root + config_arg
os.makedirs(os.path.dirname(config_path), exist_ok=True)
open(config_path, "w").write(text.replace('"/etc/seg/', f'"{root}/etc/seg/'))
r = subprocess.run([seg_bin, "check-config", "--config", config_path], capture_output=True, text=True,
                   env={**os.environ, "SEG_LOG": "off"})
if r.returncode != 0:
    problem(f"seg check-config refused the ConfigMap's seg.toml (exit {r.returncode}):\n{r.stdout}{r.stderr}")
else:
    print(f"seg check-config accepts the ConfigMap's seg.toml ({len(named)} files it names stood in)")

for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
}

# A CA, a server certificate and a CRL for the stand-in files of `seg check-config`.
stand_in_pki() {
    local d=$WORK/k8s/pki
    mkdir -p "$d/db" && touch "$d/db/index.txt" && echo 1000 >"$d/db/crlnumber" || return 1
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj "/O=seg deploy checks/CN=Stand-in CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null &&
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=seg.corp.example" \
            -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null &&
        printf 'subjectAltName=DNS:seg.corp.example\nextendedKeyUsage=serverAuth\n' >"$d/ext.cnf" &&
        openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
            -days 30 -extfile "$d/ext.cnf" -out "$d/server.pem" 2>/dev/null &&
        printf '[ca]\ndefault_ca = d\n[d]\ndatabase = %s\ncrlnumber = %s\ndefault_md = sha256\ndefault_crl_days = 7\n' \
            "$d/db/index.txt" "$d/db/crlnumber" >"$d/ca.cnf" &&
        openssl ca -gencrl -config "$d/ca.cnf" -keyfile "$d/ca.key" -cert "$d/ca.pem" \
            -out "$d/ca.crl" 2>/dev/null
}

kubernetes_references() {
    stand_in_pki || {
        echo "openssl could not make the stand-in PKI"
        return 1
    }
    kubernetes_structure
}

# --- container ----------------------------------------------------------------------------

# No engine here: parse with BuildKit's parser and check what matters statically.
containerfile() {
    PY <<'EOF'
import fnmatch, glob, os, re, subprocess, sys, tomllib
import dockerfile, yaml

path = "deploy/container/Containerfile"
problems = []
def problem(text):
    problems.append(text)
try:
    cmds = dockerfile.parse_file(path)
except dockerfile.GoParseError as e:
    print(f"{path}: does not parse: {e}")
    sys.exit(1)
known = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
         "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
for c in cmds:
    if c.cmd not in known:
        problem(f"line {c.start_line}: unknown instruction {c.cmd}")
args = {}
for c in cmds:
    if c.cmd == "FROM":
        break
    if c.cmd == "ARG" and "=" in c.value[0]:
        k, v = c.value[0].split("=", 1)
        args[k] = v
stages, current = [], None
for c in cmds:
    if c.cmd == "FROM":
        image = c.value[0]
        for k, v in args.items():
            image = image.replace("${%s}" % k, v).replace("$" + k, v)
        name = c.value[2] if len(c.value) == 3 and c.value[1].upper() == "AS" else None
        current = {"image": image, "name": name, "cmds": []}
        stages.append(current)
    elif current is not None:
        current["cmds"].append(c)
print(f"{path}: {len(cmds)} instructions, stages: " + ", ".join(f"{s['name']} ({s['image']})" for s in stages))
if len(stages) < 2:
    problem("not a multi-stage build")
for s in stages:
    if ":" not in s["image"].rsplit("/", 1)[-1] or s["image"].endswith(":latest"):
        problem(f"base image {s['image']} is not pinned to a tag")
build, final = stages[0], stages[-1]
# The builder: a Rust image no older than rust-version, a locked release build.
manifest = tomllib.load(open("Cargo.toml", "rb"))
need = tuple(int(x) for x in manifest["package"]["rust-version"].split("."))
m = re.search(r"rust:(\d+)\.(\d+)", build["image"])
if not m or tuple(int(x) for x in m.groups()) < need[:2]:
    problem(f"builder {build['image']} is older than rust-version {manifest['package']['rust-version']}")
if not any(c.cmd == "RUN" and "cargo build --release --locked" in c.value[0] for c in build["cmds"]):
    problem("the builder does not run `cargo build --release --locked`")
# The runtime: non-root numeric USER, the two ports, no HEALTHCHECK, exec-form ENTRYPOINT, and
# nothing copied but the binary and the configuration folder.
users = [c.value[0] for c in final["cmds"] if c.cmd == "USER"]
uid = users[-1].split(":")[0] if users else "0"
if not uid.isdigit() or int(uid) == 0:
    problem(f"the final stage's USER is {users[-1] if users else 'unset (root)'}: not a numeric non-root uid")
exposed = {int(p.split("/")[0]) for c in final["cmds"] if c.cmd == "EXPOSE" for p in c.value}
if any(c.cmd == "HEALTHCHECK" for c in cmds):
    problem("HEALTHCHECK present: Kubernetes probes /healthz and /readyz instead")
entry = [c for c in final["cmds"] if c.cmd == "ENTRYPOINT"]
if not entry or not entry[-1].json:
    problem("ENTRYPOINT is missing or not in exec (JSON) form: signals would go to a shell")
for c in final["cmds"]:
    if c.cmd == "ADD":
        problem(f"line {c.start_line}: ADD in the runtime stage (COPY only)")
    if c.cmd == "COPY":
        srcs, dst = c.value[:-1], c.value[-1]
        from_build = any(f.startswith("--from=") for f in c.flags)
        if from_build and dst != "/usr/local/bin/seg":
            problem(f"line {c.start_line}: copies {srcs} from the builder, not just the binary")
        if not from_build and not (dst.startswith("/etc/seg/") and all(s.startswith("config/") for s in srcs)):
            problem(f"line {c.start_line}: copies {srcs} to {dst}: only the configuration folder belongs here")
# The ports match the Deployment's container ports.
dep = next(d for d in yaml.safe_load_all(open("deploy/kubernetes/deployment.yaml")) if d and d["kind"] == "Deployment")
container = dep["spec"]["template"]["spec"]["containers"][0]
k8s_ports = {p["containerPort"] for p in container["ports"]}
if exposed != k8s_ports:
    problem(f"EXPOSE {sorted(exposed)} differs from the Deployment's container ports {sorted(k8s_ports)}")
if str(dep["spec"]["template"]["spec"]["securityContext"].get("runAsUser")) != uid:
    problem(f"the Deployment's runAsUser differs from the image's USER {uid}")
print(f"runtime stage: USER {users[-1] if users else '-'}, EXPOSE {sorted(exposed)} (= Deployment ports),"
      " no HEALTHCHECK, exec-form ENTRYPOINT, copies only the binary and config/")

# The build context: what the ignore file lets through and the builder copies must hold every
# file cargo needs: the manifest, the lock file, the targets it names, the files src/ includes.
ignore = [l.strip() for l in open(path + ".dockerignore") if l.strip() and not l.startswith("#")]
def included(p):
    keep = True
    for pat in ignore:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = p.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
            keep = neg
    return keep
tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True, check=True).stdout.split()
context = {p for p in tracked if included(p)}
copied = set()
for c in build["cmds"]:
    if c.cmd == "COPY" and not c.flags:
        for src in c.value[:-1]:
            copied |= {p for p in context if p == src or p.startswith(src.rstrip("/") + "/")}
needed = {"Cargo.toml", "Cargo.lock"}
for section in ("bin", "bench", "test", "example"):
    for target in manifest.get(section, []):
        if "path" in target:
            needed.add(target["path"])
        elif section == "bench":
            needed.add(f"benches/{target['name']}.rs")
needed.add(manifest.get("lib", {}).get("path", "src/lib.rs"))
for f in glob.glob("src/**/*.rs", recursive=True):
    for inc in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', open(f).read()):
        needed.add(os.path.normpath(os.path.join(os.path.dirname(f), inc)))
missing = sorted(n for n in needed if n not in copied)
if missing:
    problem(f"the build stage would lack {missing} (Containerfile COPY or Containerfile.dockerignore)")
if any(p.startswith(("target/", "tests/", ".git/")) for p in context):
    problem("the build context would include target/, tests/ or .git/")
print(f"build context: {len(context)} files; the builder gets all {len(needed)} files cargo needs"
      " (manifest, lock, targets, include_str! files); target/ and tests/ stay out")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
}

# --- run ----------------------------------------------------------------------------------

echo "==> deploy checks (deploy/, docs/operations.md)"
check "prerequisites: tools, Python packages, target/release/seg" prerequisites
if ((${#FAILED[@]} != 0)); then
    echo
    echo "deploy-checks: ${#PASSED[@]} passed, ${#FAILED[@]} failed"
    exit 1
fi
check "Prometheus rules: promtool check rules + promtool test rules" prometheus_rules
check "alerts: annotations, runbook sections, firing and quiet test cases" alert_coverage
check "Grafana dashboard: JSON, panels, queries parse as PromQL" dashboard
check "metric names used by alerts and dashboard exist in src/metrics.rs" metric_names
check "systemd: verify, hardening directives, security exposure, sysusers" systemd_unit
check "Kubernetes: manifests against the Kubernetes JSON schemas" kubernetes_schemas
check "Kubernetes: ServiceMonitor, kustomization, cross-references, seg check-config" kubernetes_references
check "Containerfile: parse, stages, non-root USER, ports, build context" containerfile

echo
if ((${#FAILED[@]} != 0)); then
    printf 'failed: %s\n' "${FAILED[@]}"
fi
echo "deploy-checks: ${#PASSED[@]} passed, ${#FAILED[@]} failed"
((${#FAILED[@]} == 0))
