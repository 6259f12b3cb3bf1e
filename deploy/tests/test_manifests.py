#!/usr/bin/env python3
"""Checks the rendered Kubernetes manifests against the binary they run.

    test_manifests.py OVERLAY=RENDERED.yaml [OVERLAY=RENDERED.yaml ...]

OVERLAY is `local`, `aws-eks` or `gcp-gke`; RENDERED.yaml is `kubectl kustomize deploy/k8s/overlays/OVERLAY`.
What the binary serves is read from its source, so a renamed route, a moved port or a new
service fails here instead of in a cluster:

- the services:           `ServiceName::X => "x"` in crates/mercato/src/startup.rs
- their default ports:    `x: ServiceSettings::on(PORT)` (or `x: XSettings { service: ServiceSettings::on(PORT), .. }`) in crates/kit/src/config.rs
- the operations port:    `OpsSettings { port: PORT }` in crates/kit/src/config.rs
- what each listener serves besides a service's API: the `.route("/path", ...)` of
  `pub fn app` (the service listener) and of `pub fn ops_app` (the operations listener) in
  crates/kit/src/server.rs

Checked for every service: a Deployment, Service, ServiceAccount, PodDisruptionBudget and (all
but analytics) a HorizontalPodAutoscaler; `mercato serve <service>`; the container port `http`,
the `MERCATO_<SERVICE>__PORT` setting and the Service's one port all equal the binary's default
port; the container port `ops` and `MERCATO_OPS__PORT` (when set) the operations port, which no
Service exposes; the Prometheus annotations scrape a path the operations listener serves on
that port; the readiness probe GETs /ready on the operations port, the liveness probe /health,
the startup probe a served path, each on a listener that serves it (liveness and startup on the
same one); MERCATO_HOST=0.0.0.0; the peer URLs point at the right Service and port; the data
directory is a writable emptyDir under a read-only root; the pod runs non-root with no
capabilities; every ConfigMap/Secret referenced exists (except the operator-created Secrets).
Keys (auth.*): every service but the gateway reads the service key from the file
`MERCATO_AUTH__SERVICE_KEY_FILE`, the key `service-key.pem` of the Secret `mercato-auth`
mounted read-only; only users reads the token signing key (`MERCATO_AUTH__SIGNING_KEY_FILE`,
`signing-key.pem`); the gateway mounts neither; no key is given as an environment value, and
access control is never turned off (`MERCATO_AUTH__MODE=open`). On aws-eks, orders, payments and notifications keep their
data in DynamoDB: `MERCATO_<SERVICE>__DATABASE_URL=dynamodb://<prefix>-<service>?region=ap-south-1`
(no endpoint: AWS's own) with an IRSA role; no other service has a DynamoDB URL, and none has
one on the local overlay (embedded stores). NetworkPolicies: evaluated pairwise, pod-to-pod traffic
inside the namespace is allowed for exactly the calls in docs/architecture.md (and every
service's to the users service's JWKS) and nothing more; the operations port admits Prometheus
(namespace `monitoring`) and nothing from outside the cluster or from the other pods; every
service may reach HTTPS outside the cluster (the signing keys of the token issuers it
verifies). On aws-eks, MERCATO_AUTH__ISSUERS is one TOML inline array naming the Cognito user
pool of ap-south-1 as issuer the way Cognito access tokens need it (audience in `client_id`,
roles in `cognito:groups`, JWKS at ISSUER/.well-known/jwks.json).
On both cloud overlays (aws-eks, gcp-gke): every image is pinned by digest and no checkov
suppression is left; payments runs Stripe in environment production; the gateway's Ingress
routes to the gateway Service's port only and its load balancer health check asks that port for
a path the service listener serves (aws-eks: the ALB's healthcheck-path; gcp-gke: the
BackendConfig named by the gateway Service, else GKE's default GET /). On gcp-gke: the Ingress is
GKE's (annotation kubernetes.io/ingress.class: gce, no ingressClassName), HTTPS only, with the
ManagedCertificate and FrontendConfig it names; the gateway Service has container-native load
balancing (cloud.google.com/neg, needed by a ClusterIP Service); no store is on DynamoDB and no
ServiceAccount has an AWS role; the rate limits trust Google's front ends
(MERCATO_RATE_LIMIT__TRUSTED_PROXIES); no service may reach GKE's metadata server.
Traces: on aws-eks and gcp-gke an OpenTelemetry Collector runs (Deployment and Service
`otel-collector`, image pinned by digest, non-root, read-only root, probes on its health_check
port 13133); the configuration its `--config` names, read from the mounted ConfigMap, has an OTLP
receiver on HTTP port 4318 feeding a traces pipeline that starts with memory_limiter, batches,
and exports with the overlay's exporter (aws-eks awsxray, gcp-gke googlecloud); the Service's
port 4318 reaches that receiver; every service has
OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector:4318 (and parent-based ratio sampling), may
reach the collector on 4318 through the NetworkPolicies, nothing outside the cluster may, and the
collector reaches none of the services but may reach HTTPS outside. The collector's identity: on
aws-eks an IRSA role; on gcp-gke Workload Identity (its ServiceAccount annotated
iam.gke.io/gcp-service-account with a Google service account's email, on nodes running GKE's
metadata server, which the NetworkPolicies let it reach on both dataplanes' addresses), and no
Mercato ServiceAccount bound to a Google service account. On any overlay an OTLP endpoint names a
Service of the render on a port it exposes (the local overlay sets none: traces off).
Collector configurations that no overlay renders (COLLECTOR_FILES) are held to the same shape.
Exit status 1 with one line per problem.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "mercato"
# HTTP calls between services (docs/architecture.md); everything else goes through Kafka/SQS.
CALLS = {
    ("gateway", "users"), ("gateway", "products"), ("gateway", "orders"), ("gateway", "payments"),
    ("gateway", "notifications"), ("gateway", "analytics"),
    ("orders", "users"), ("orders", "products"),
    ("payments", "orders"),
}
# Every service verifies access tokens with the users service's JWKS
# (`<users url>/.well-known/jwks.json`, crates/mercato/src/startup.rs).
JWKS_CALLS = {(svc, "users") for svc in ("gateway", "products", "orders", "payments", "notifications", "analytics")}
# Where Prometheus runs: the only peer admitted to the operations port (NetworkPolicy prometheus-scrape).
MONITORING_NAMESPACE = "monitoring"
# The identity keys (docs/deploy.md, "Identity keys"): the Secret, its keys, who mounts which.
AUTH_SECRET = "mercato-auth"
SIGNING_KEY, SERVICE_KEY = "signing-key.pem", "service-key.pem"
SIGNS_TOKENS = {"users"}                 # holds auth.signing_key
NO_SERVICE_KEY = {"gateway"}             # calls no /internal/* route, must not be able to
# Analytics keeps window state per instance: one replica, no autoscaler (deploy/k8s/base/analytics.yaml).
NO_HPA = {"analytics"}
# Services that call AWS APIs and get an IRSA role on EKS (deploy/terraform/aws/iam_irsa.tf).
IRSA = {"orders", "payments", "notifications", "analytics"}
# Services whose store is a DynamoDB table on EKS (the only ones the binary lets use one:
# `Service::may_use_dynamo` in crates/kit/src/wiring.rs), selected by their database URL.
DYNAMODB = {"orders", "payments", "notifications"}
REGION = "ap-south-1"
# Every service verifies bearer tokens: each fetches the signing keys (JWKS) of the external
# issuers in auth.issuers over HTTPS (Amazon Cognito on EKS: docs/deploy.md).
OUTSIDE_HTTPS = 443
# The Cognito user pool as an issuer (deploy/terraform/aws/cognito.tf, output k8s_settings_env).
COGNITO_ISSUER = re.compile(r"https://cognito-idp\.([a-z0-9-]+)\.amazonaws\.com/\1_[0-9A-Za-z]+")
# The Secrets the operator creates (docs/deploy.md); not part of the rendered output. The keys
# are never committed, not even the local overlay's.
# Stripe's keys (docs/deploy.md, "Payments with Stripe"): files of this Secret, payments only.
STRIPE_SECRET = "mercato-stripe"
STRIPE_FILES = {"MERCATO_PAYMENTS__STRIPE__SECRET_KEY_FILE": "secret-key",
                "MERCATO_PAYMENTS__STRIPE__WEBHOOK_SECRET_FILE": "webhook-secret"}
EXTERNAL_SECRETS = {"aws-eks": {"mercato-secrets", AUTH_SECRET, STRIPE_SECRET},
                    "gcp-gke": {"mercato-secrets", AUTH_SECRET, STRIPE_SECRET}, "local": {AUTH_SECRET}}
# The overlays that take real traffic and money: images by digest, Stripe, an Ingress.
PRODUCTION = ("aws-eks", "gcp-gke")
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"
IAM_ROLE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/.+")
# GKE (docs/deploy.md, "Kubernetes on GKE"): Workload Identity binds a Kubernetes ServiceAccount to
# a Google service account (GSA) by this annotation; only the collector calls a Google API.
WORKLOAD_IDENTITY = "iam.gke.io/gcp-service-account"
GSA_EMAIL = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]@[a-z][a-z0-9-]{4,28}[a-z0-9]\.iam\.gserviceaccount\.com$")
# GKE's metadata server (Workload Identity tokens, the project id), as the NetworkPolicies see it:
# 169.254.169.252:988 under Calico, 169.254.169.254:80 under Dataplane V2.
GKE_METADATA = (("169.254.169.252", 988), ("169.254.169.254", 80))
# Nodes that run GKE's metadata server carry this label (Workload Identity on the node pool).
GKE_METADATA_NODES = {"iam.gke.io/gke-metadata-server-enabled": "true"}
# Where Google's external Application Load Balancer (and its health checks) reach the pods from.
GOOGLE_FRONT_ENDS = {"35.191.0.0/16", "130.211.0.0/22"}
# Traces (docs/deploy.md, "Traces and the collector"): the OpenTelemetry Collector each overlay runs
# and the exporter its traces pipeline must end in; the services send OTLP over HTTP/protobuf only
# (crates/kit/src/telemetry/otel.rs), so to the collector's HTTP port.
COLLECTOR = "otel-collector"
COLLECTOR_EXPORTER = {"aws-eks": "awsxray", "gcp-gke": "googlecloud"}
OTLP_HTTP_PORT = 4318
COLLECTOR_HEALTH_PORT = 13133            # the health_check extension
COLLECTOR_ENDPOINT = f"http://{COLLECTOR}:{OTLP_HTTP_PORT}"
# Collector configurations no overlay renders, and the exporter each must use (none today:
# deploy/observability/collector/eks.yaml and gcp/gcp.yaml are rendered by aws-eks and gcp-gke).
COLLECTOR_FILES: dict[str, str] = {}


def source(path: str) -> str:
    return (ROOT / path).read_text()


def function_body(text: str, name: str) -> str | None:
    """The text of `pub fn NAME(...) { ... }`, up to the `}` that closes it at column 0."""
    m = re.search(r"^pub fn %s\(.*?^\}" % re.escape(name), text, re.S | re.M)
    return m.group(0) if m else None


def port_of(endpoint: object) -> int | None:
    """The port of a collector `endpoint` (`host:port`, `${env:MY_POD_IP}:4318`, `:4318`)."""
    m = re.search(r":(\d+)$", str(endpoint or ""))
    return int(m.group(1)) if m else None


def collector_config_problems(config: object, exporter: str) -> list[str]:
    """What keeps an OpenTelemetry Collector configuration from taking the services' OTLP/HTTP
    spans on 4318 and exporting them with `exporter` (receivers/processors/exporters/service)."""
    if not isinstance(config, dict):
        return ["is not a YAML mapping"]
    problems = []
    section = lambda name: config.get(name) or {}
    receivers, processors, exporters = section("receivers"), section("processors"), section("exporters")
    service = section("service")
    http = ((receivers.get("otlp") or {}).get("protocols") or {})
    if "http" not in http:
        problems.append("has no otlp receiver with the http protocol (the services send OTLP over HTTP/protobuf only)")
    elif port_of((http["http"] or {}).get("endpoint")) != OTLP_HTTP_PORT:
        problems.append(f"otlp http receiver endpoint {(http['http'] or {}).get('endpoint')!r} is not on port {OTLP_HTTP_PORT}")
    if exporter not in exporters:
        problems.append(f"has no {exporter} exporter")
    if port_of((section("extensions").get("health_check") or {}).get("endpoint")) != COLLECTOR_HEALTH_PORT \
            or "health_check" not in (service.get("extensions") or []):
        problems.append(f"has no health_check extension on port {COLLECTOR_HEALTH_PORT} enabled in service.extensions (the probes)")
    pipelines = {name: p for name, p in (service.get("pipelines") or {}).items()
                 if name == "traces" or name.startswith("traces/")}
    if not any(exporter in (p.get("exporters") or []) and "otlp" in (p.get("receivers") or []) for p in pipelines.values()):
        problems.append(f"has no traces pipeline from the otlp receiver to the {exporter} exporter")
    for name, p in pipelines.items():
        procs = p.get("processors") or []
        for proc in procs:
            if proc not in processors:
                problems.append(f"pipeline {name} uses processor {proc}, which is not configured")
        for e in p.get("exporters") or []:
            if e not in exporters:
                problems.append(f"pipeline {name} uses exporter {e}, which is not configured")
        if not procs or procs[0] != "memory_limiter":
            problems.append(f"pipeline {name}: processors {procs} do not start with memory_limiter")
        if "batch" not in procs:
            problems.append(f"pipeline {name}: processors {procs} do not batch")
    return problems


class Facts:
    """What the binary serves, read from its source."""

    def __init__(self) -> None:
        startup, config, server = (source(f) for f in (
            "crates/mercato/src/startup.rs", "crates/kit/src/config.rs", "crates/kit/src/server.rs"))
        self.services = list(dict.fromkeys(re.findall(r'ServiceName::\w+\s*=>\s*"([a-z]+)"', startup)))
        self.ports = {name: int(port) for name, port in
                      re.findall(r"\b([a-z]+):\s*(?:\w+Settings\s*\{\s*service:\s*)?ServiceSettings::on\((\d+)\)", config)}
        ops = re.search(r"OpsSettings\s*\{\s*port:\s*(\d+)\s*\}", config)
        self.ops_port = int(ops.group(1)) if ops else None
        routes = lambda body: set(re.findall(r'\.route\(\s*"(/[^"]*)"', body or ""))
        app, ops_app = function_body(server, "app"), function_body(server, "ops_app")
        # Besides its API, a service listener serves `app`'s routes; the operations listener `ops_app`'s.
        self.service_paths, self.ops_paths = routes(app), routes(ops_app)
        problems = []
        if not self.services:
            problems.append("no `ServiceName::X => \"x\"` arms found in crates/mercato/src/startup.rs")
        for s in self.services:
            if s not in self.ports:
                problems.append(f"no `{s}: ServiceSettings::on(PORT)` default in crates/kit/src/config.rs")
        if self.ops_port is None:
            problems.append("no `OpsSettings { port: PORT }` default in crates/kit/src/config.rs")
        elif self.ops_port in self.ports.values():
            problems.append(f"the operations port {self.ops_port} is also a service's port")
        if app is None or ops_app is None:
            problems.append("crates/kit/src/server.rs has no `pub fn app` or no `pub fn ops_app`")
        if "/health" not in self.service_paths:
            problems.append("crates/kit/src/server.rs `app` no longer routes /health")
        for p in ("/health", "/ready", "/metrics"):
            if p not in self.ops_paths:
                problems.append(f"crates/kit/src/server.rs `ops_app` no longer routes {p}")
        if problems:
            sys.exit("test_manifests: cannot read the binary's facts from source:\n  " + "\n  ".join(problems))

    def served(self, port: int | None, svc: str) -> set[str] | None:
        """The non-API paths served on `port` of a `serve <svc>` pod; None: nothing listens there."""
        if port == self.ports[svc]:
            return self.service_paths
        if port == self.ops_port:
            return self.ops_paths
        return None


class Checker:
    def __init__(self, overlay: str, docs: list[dict], facts: Facts):
        self.overlay, self.facts = overlay, facts
        self.services, self.ports, self.ops_port = facts.services, facts.ports, facts.ops_port
        self.problems: list[str] = []
        self.by_kind: dict[str, dict[str, dict]] = {}
        for d in docs:
            self.by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d

    def fail(self, what: str) -> None:
        self.problems.append(f"{self.overlay}: {what}")

    def get(self, kind: str, name: str) -> dict | None:
        return self.by_kind.get(kind, {}).get(name)

    # ---------------------------------------------------------------- per service
    def check_service(self, svc: str) -> None:
        port = self.ports[svc]
        for kind in ("Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"):
            if not self.get(kind, svc):
                self.fail(f"no {kind} named {svc}")
        if svc not in NO_HPA:
            hpa = self.get("HorizontalPodAutoscaler", svc)
            if not hpa:
                self.fail(f"no HorizontalPodAutoscaler named {svc}")
            else:
                ref = hpa["spec"]["scaleTargetRef"]
                if (ref.get("kind"), ref.get("name")) != ("Deployment", svc):
                    self.fail(f"HorizontalPodAutoscaler {svc} scales {ref}")
                metrics = [m["resource"]["name"] for m in hpa["spec"].get("metrics", []) if m.get("type") == "Resource"]
                if "cpu" not in metrics:
                    self.fail(f"HorizontalPodAutoscaler {svc} does not scale on CPU")
        dep = self.get("Deployment", svc)
        if not dep:
            return
        for d in self.docs_of("Deployment"):
            if d["metadata"].get("namespace") != NAMESPACE:
                self.fail(f"Deployment {d['metadata']['name']} is not in namespace {NAMESPACE}")
        pod = dep["spec"]["template"]
        spec = pod["spec"]
        labels = pod["metadata"].get("labels", {})
        containers = spec.get("containers", [])
        if len(containers) != 1:
            self.fail(f"Deployment {svc} has {len(containers)} containers, expected 1")
            return
        c = containers[0]
        where = f"Deployment {svc} container {c.get('name')}"

        # mercato serve <svc>
        command, args = c.get("command"), c.get("args")
        if command is not None and (len(command) != 1 or not command[0].endswith("/mercato")):
            self.fail(f"{where}: command {command}, expected the mercato binary")
        if args != ["serve", svc]:
            self.fail(f"{where}: args {args}, expected ['serve', '{svc}']")

        # ports
        named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if named.get("http") != port:
            self.fail(f"{where}: containerPort 'http' is {named.get('http')}, the binary's {svc} port is {port}")
        ops = self.ops_port
        if named.get("ops") != ops:
            self.fail(f"{where}: containerPort 'ops' is {named.get('ops')}, the binary's operations port is {ops}")
        env = self.environment(c, where)
        if env.get(f"MERCATO_{svc.upper()}__PORT") != str(port):
            self.fail(f"{where}: MERCATO_{svc.upper()}__PORT is {env.get(f'MERCATO_{svc.upper()}__PORT')!r}, expected '{port}'")
        if env.get("MERCATO_OPS__PORT", str(ops)) != str(ops):
            self.fail(f"{where}: MERCATO_OPS__PORT is {env['MERCATO_OPS__PORT']!r}, the ops container port and the probes expect '{ops}'")
        if env.get("MERCATO_HOST") != "0.0.0.0":
            self.fail(f"{where}: MERCATO_HOST is {env.get('MERCATO_HOST')!r}, expected '0.0.0.0' (the default 127.0.0.1 is unreachable)")

        # probes: each GETs a path that the listener behind its port serves
        probe_ports = {}
        for probe, expected, expected_port in (("readinessProbe", "/ready", ops), ("livenessProbe", "/health", None),
                                               ("startupProbe", None, None)):
            p = c.get(probe)
            if p is None:
                if probe != "startupProbe":
                    self.fail(f"{where}: no {probe}")
                continue
            get = p.get("httpGet")
            if not get:
                self.fail(f"{where}: {probe} is not an HTTP GET")
                continue
            path = get.get("path")
            if expected and path != expected:
                self.fail(f"{where}: {probe} path {path!r}, expected {expected!r}")
            probe_port = named.get(get.get("port")) if isinstance(get.get("port"), str) else get.get("port")
            probe_ports[probe] = probe_port
            served = self.facts.served(probe_port, svc)
            if served is None:
                self.fail(f"{where}: {probe} port {get.get('port')!r} resolves to {probe_port}; the binary listens on "
                          f"{port} (service) and {ops} (operations)")
            elif path not in served:
                listener = "service" if probe_port == port else "operations"
                self.fail(f"{where}: {probe} path {path!r} is not served by the binary on port {probe_port} "
                          f"(its {listener} listener serves {sorted(served)} besides the API)")
            if expected_port is not None and probe_port != expected_port:
                self.fail(f"{where}: {probe} port {get.get('port')!r} resolves to {probe_port}, expected the operations port {ops}")
        if "startupProbe" in probe_ports and "livenessProbe" in probe_ports \
                and probe_ports["startupProbe"] != probe_ports["livenessProbe"]:
            self.fail(f"{where}: startupProbe on port {probe_ports['startupProbe']} but livenessProbe on "
                      f"{probe_ports['livenessProbe']}: start-up must wait for what liveness checks")

        # Prometheus: the operations listener's /metrics
        ann = pod["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(ops) \
                or ann.get("prometheus.io/path") not in self.facts.ops_paths:
            self.fail(f"Deployment {svc}: Prometheus annotations {ann} do not scrape a path the operations listener "
                      f"serves on {ops} ({sorted(self.facts.ops_paths)})")

        # security
        psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
        if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
            self.fail(f"{where}: runAsNonRoot is not set")
        if csc.get("readOnlyRootFilesystem") is not True:
            self.fail(f"{where}: the root filesystem is writable")
        if csc.get("allowPrivilegeEscalation") is not False:
            self.fail(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in csc.get("capabilities", {}).get("drop", []) or csc.get("capabilities", {}).get("add"):
            self.fail(f"{where}: capabilities are not dropped to none")
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            self.fail(f"{where}: seccompProfile is {seccomp}, expected RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            self.fail(f"Deployment {svc}: automountServiceAccountToken is not false")
        if spec.get("enableServiceLinks") is not False:
            # Service links inject <SERVICE>_PORT=tcp://... variables; one named MERCATO_* would be
            # read as an unknown setting and refused at start-up.
            self.fail(f"Deployment {svc}: enableServiceLinks is not false")
        if spec.get("serviceAccountName") != svc:
            self.fail(f"Deployment {svc}: serviceAccountName {spec.get('serviceAccountName')!r}, expected {svc!r}")
        res = c.get("resources", {})
        for k in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(k, {}):
                    self.fail(f"{where}: no {k}.{r}")

        # the data directory: a writable emptyDir
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        data_dir = env.get("MERCATO_DATA_DIR")
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        if not data_dir or data_dir not in mounts:
            self.fail(f"{where}: MERCATO_DATA_DIR {data_dir!r} is not a mounted volume (the root filesystem is read-only)")
        else:
            m = mounts[data_dir]
            if m.get("readOnly") or "emptyDir" not in volumes.get(m["name"], {}):
                self.fail(f"{where}: the data directory {data_dir} is not a writable emptyDir")

        # settings file (secret settings as a file, not env)
        config = env.get("MERCATO_CONFIG")
        if config:
            source_of = self.secret_file(config, mounts, volumes)
            if source_of is None:
                self.fail(f"{where}: MERCATO_CONFIG={config} is not a file of a mounted Secret")
            elif source_of[1] != f"{svc}.toml":
                self.fail(f"{where}: its settings file is not the Secret's key {svc}.toml")

        # identity keys: files of the mercato-auth Secret, each pod only the ones it needs
        self.check_keys(svc, where, env, mounts, volumes)

        # Service
        service = self.get("Service", svc)
        if service:
            sel = service["spec"].get("selector", {})
            if not sel or any(labels.get(k) != v for k, v in sel.items()):
                self.fail(f"Service {svc} selector {sel} does not select Deployment {svc}'s pods {labels}")
            sp = service["spec"].get("ports", [])
            for s in sp:
                t = s.get("targetPort", s.get("port"))
                if (named.get(t) if isinstance(t, str) else t) == ops or s.get("port") == ops:
                    self.fail(f"Service {svc} exposes the operations port {ops} (/ready, /metrics are for the "
                              "kubelet and Prometheus, which reach the pod directly)")
            if len(sp) != 1 or sp[0].get("port") != port:
                self.fail(f"Service {svc} ports {sp}, expected one port {port}")
            else:
                target = sp[0].get("targetPort", sp[0]["port"])
                target = named.get(target) if isinstance(target, str) else target
                if target != port:
                    self.fail(f"Service {svc} targetPort resolves to {target}, the container listens on {port}")

        # every other service's URL, as this pod sees it
        for peer in self.services:
            url = env.get(f"MERCATO_{peer.upper()}__URL")
            if url != f"http://{peer}:{self.ports[peer]}":
                self.fail(f"{where}: MERCATO_{peer.upper()}__URL is {url!r}, expected 'http://{peer}:{self.ports[peer]}'")

    @staticmethod
    def secret_file(path: str, mounts: dict, volumes: dict) -> tuple[str, str] | None:
        """(Secret name, key) of the file `path` when it is an item of a mounted Secret volume."""
        mount = next((m for p, m in mounts.items() if path.startswith(p.rstrip("/") + "/")), None)
        vol = volumes.get(mount["name"]) if mount else None
        if not vol or "secret" not in vol:
            return None
        rel = path[len(mount["mountPath"].rstrip("/")) + 1:]
        item = next((i for i in vol["secret"].get("items", []) if i.get("path") == rel), None)
        if item is None:
            return None
        if not mount.get("readOnly"):
            return None
        return vol["secret"]["secretName"], item["key"]

    def check_keys(self, svc: str, where: str, env: dict, mounts: dict, volumes: dict) -> None:
        if env.get("MERCATO_AUTH__MODE", "secure").lower() != "secure":
            self.fail(f"{where}: MERCATO_AUTH__MODE={env['MERCATO_AUTH__MODE']}: access control must stay on in a deployment")
        for inline in ("MERCATO_AUTH__SIGNING_KEY", "MERCATO_AUTH__SERVICE_KEY"):
            if inline in env:
                self.fail(f"{where}: {inline} as an environment value; mount the key as a file ({inline}_FILE)")
        # What the pod can read of the Secret at all, whatever the environment says.
        mounted = {i["key"] for v in volumes.values() if v.get("secret", {}).get("secretName") == AUTH_SECRET
                   for i in v["secret"].get("items", [{"key": "*all*"}])}
        if "*all*" in mounted:
            self.fail(f"{where}: mounts the whole Secret {AUTH_SECRET}; list the items it needs")
        for var, key, wanted in (("MERCATO_AUTH__SIGNING_KEY_FILE", SIGNING_KEY, svc in SIGNS_TOKENS),
                                 ("MERCATO_AUTH__SERVICE_KEY_FILE", SERVICE_KEY, svc not in NO_SERVICE_KEY)):
            path = env.get(var)
            if not wanted:
                if path or key in mounted or "*all*" in mounted:
                    self.fail(f"{where}: holds {key} ({var}={path!r}); only "
                              f"{sorted(SIGNS_TOKENS) if key == SIGNING_KEY else sorted(set(self.services) - NO_SERVICE_KEY)} may")
                continue
            if not path:
                self.fail(f"{where}: no {var}; it needs the key {key} of the Secret {AUTH_SECRET}")
                continue
            if self.secret_file(path, mounts, volumes) != (AUTH_SECRET, key):
                self.fail(f"{where}: {var}={path} is not the key {key} of the Secret {AUTH_SECRET} mounted read-only")

    def docs_of(self, kind: str) -> list[dict]:
        return list(self.by_kind.get(kind, {}).values())

    def environment(self, c: dict, where: str) -> dict[str, str]:
        """The container's environment: envFrom ConfigMaps resolved, then env (which wins)."""
        env: dict[str, str] = {}
        for src in c.get("envFrom", []):
            if "configMapRef" in src:
                name = src["configMapRef"]["name"]
                cm = self.get("ConfigMap", name)
                if cm is None:
                    self.fail(f"{where}: envFrom ConfigMap {name} is not in the output")
                    continue
                env.update({k: str(v) for k, v in cm.get("data", {}).items()})
            elif "secretRef" in src:
                self.fail(f"{where}: secrets as environment variables (envFrom {src['secretRef']['name']}); mount them as the settings file")
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = str(e["value"])
            elif "secretKeyRef" in e.get("valueFrom", {}):
                self.fail(f"{where}: {e['name']} from a Secret as an environment variable; mount it as the settings file")
        return env

    # ---------------------------------------------------------------- references
    def check_references(self) -> None:
        external = EXTERNAL_SECRETS.get(self.overlay, set())
        for dep in self.docs_of("Deployment"):
            name = dep["metadata"]["name"]
            for v in dep["spec"]["template"]["spec"].get("volumes", []):
                if "secret" in v:
                    s = v["secret"]["secretName"]
                    secret = self.get("Secret", s)
                    if secret is None and s not in external:
                        self.fail(f"Deployment {name}: Secret {s} is neither rendered nor created by the operator")
                    if secret is not None:
                        for i in v["secret"].get("items", []):
                            if i["key"] not in secret.get("data", {}) and i["key"] not in secret.get("stringData", {}):
                                self.fail(f"Deployment {name}: Secret {s} has no key {i['key']}")
                if "configMap" in v and self.get("ConfigMap", v["configMap"]["name"]) is None:
                    self.fail(f"Deployment {name}: ConfigMap {v['configMap']['name']} is not in the output")

    # ---------------------------------------------------------------- network policies
    def check_network_policies(self) -> None:
        policies = self.docs_of("NetworkPolicy")
        if not policies:
            self.fail("no NetworkPolicy")
            return
        deny = [p for p in policies if p["spec"].get("podSelector") in ({}, None)
                and set(p["spec"].get("policyTypes", [])) >= {"Ingress", "Egress"}
                and not p["spec"].get("ingress") and not p["spec"].get("egress")]
        if not deny:
            self.fail("no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no rules)")
        pods = {}  # the services' pods; the collector's are checked in check_traces
        for dep in self.docs_of("Deployment"):
            if dep["metadata"]["name"] == COLLECTOR and self.overlay in COLLECTOR_EXPORTER:
                continue
            tmpl = dep["spec"]["template"]
            pods[dep["metadata"]["name"]] = tmpl["metadata"].get("labels", {})
        allowed = set()
        for src in pods:
            for dst in pods:
                if src != dst and self.allows(policies, pods, src, dst, self.ports.get(dst)):
                    allowed.add((src, dst))
        expected = {(a, b) for a, b in CALLS | JWKS_CALLS if a in pods and b in pods}
        for a, b in sorted(expected - allowed):
            what = "a call the architecture makes" if (a, b) in CALLS else "the JWKS that verifies access tokens"
            self.fail(f"NetworkPolicies block {a} -> {b}:{self.ports[b]}, {what}")
        for a, b in sorted(allowed - expected):
            self.fail(f"NetworkPolicies allow {a} -> {b}:{self.ports[b]}, a call the architecture does not make")
        ingress_gateway = self.allows_from_outside(policies, pods["gateway"], self.ports["gateway"]) if "gateway" in pods else False
        if not ingress_gateway:
            self.fail("NetworkPolicies do not admit outside traffic (the load balancer) to the gateway")
        # The operations port: Prometheus only (the kubelet's probes come from the node).
        ops = self.ops_port
        for dst in sorted(pods):
            if not self.allows_from_namespace(policies, pods[dst], ops, MONITORING_NAMESPACE):
                self.fail(f"NetworkPolicies block Prometheus (namespace {MONITORING_NAMESPACE}) -> {dst}:{ops}, its /metrics")
            if self.allows_from_outside(policies, pods[dst], ops, any_rule=True):
                self.fail(f"NetworkPolicies admit traffic from outside the cluster to {dst}:{ops}, the operations port")
            for src in sorted(pods):
                if src != dst and self.allows(policies, pods, src, dst, ops):
                    self.fail(f"NetworkPolicies allow {src} -> {dst}:{ops}, the operations port (Prometheus only)")
        for svc in sorted(pods):
            if not self.allows_to_outside(policies, pods[svc], OUTSIDE_HTTPS):
                self.fail(f"NetworkPolicies block {svc} -> outside:{OUTSIDE_HTTPS}, the token issuers' signing keys (JWKS)")

    @staticmethod
    def matches(selector: dict | None, labels: dict) -> bool:
        if selector is None:
            return False
        for k, v in selector.get("matchLabels", {}).items():
            if labels.get(k) != v:
                return False
        for e in selector.get("matchExpressions", []):
            value, op = labels.get(e["key"]), e["operator"]
            if op == "In" and value not in e["values"]:
                return False
            if op == "NotIn" and value in e["values"]:
                return False
            if op == "Exists" and e["key"] not in labels:
                return False
            if op == "DoesNotExist" and e["key"] in labels:
                return False
        return True

    @staticmethod
    def port_ok(rule: dict, port: int) -> bool:
        ports = rule.get("ports")
        if not ports:
            return True
        return any(p.get("port") in (port, None) and p.get("protocol", "TCP") == "TCP" for p in ports)

    def peer_is_pod(self, peers: list | None, labels: dict) -> bool:
        """Does a from/to list admit a pod of this namespace with these labels? (ipBlock: no.)"""
        if not peers:
            return True
        for peer in peers:
            ns = peer.get("namespaceSelector")
            if "ipBlock" in peer:
                continue
            if ns is not None and not self.matches(ns, {"kubernetes.io/metadata.name": NAMESPACE}):
                continue
            pod_sel = peer.get("podSelector")
            if pod_sel is None or self.matches(pod_sel, labels):
                return True
        return False

    def allows(self, policies: list, pods: dict, src: str, dst: str, port: int | None) -> bool:
        if port is None:
            return False
        src_l, dst_l = pods[src], pods[dst]
        egress = [p for p in policies if "Egress" in p["spec"].get("policyTypes", []) and self.matches(p["spec"].get("podSelector", {}), src_l)]
        ingress = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and self.matches(p["spec"].get("podSelector", {}), dst_l)]
        out_ok = not egress or any(self.port_ok(r, port) and self.peer_is_pod(r.get("to"), dst_l)
                                   for p in egress for r in p["spec"].get("egress", []))
        in_ok = not ingress or any(self.port_ok(r, port) and self.peer_is_pod(r.get("from"), src_l)
                                   for p in ingress for r in p["spec"].get("ingress", []))
        return out_ok and in_ok

    def allows_from_outside(self, policies: list, labels: dict, port: int, any_rule: bool = False) -> bool:
        """Does some rule admit `port` from anywhere (no `from`)? With any_rule, an ipBlock counts too."""
        ingress = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and self.matches(p["spec"].get("podSelector", {}), labels)]
        return not ingress or any(
            self.port_ok(r, port) and (not r.get("from") or (any_rule and any("ipBlock" in peer for peer in r["from"])))
            for p in ingress for r in p["spec"].get("ingress", []))

    def allows_from_namespace(self, policies: list, labels: dict, port: int, namespace: str) -> bool:
        """Do the ingress policies admit `port` from any pod of another namespace?"""
        ingress = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and self.matches(p["spec"].get("podSelector", {}), labels)]
        ns_labels = {"kubernetes.io/metadata.name": namespace}
        return not ingress or any(
            self.port_ok(r, port) and (not r.get("from") or any(
                "namespaceSelector" in peer and self.matches(peer["namespaceSelector"], ns_labels)
                and (peer.get("podSelector") in (None, {})) for peer in r["from"]))
            for p in ingress for r in p["spec"].get("ingress", []))

    def allows_to_outside(self, policies: list, labels: dict, port: int) -> bool:
        """May a pod with these labels open TCP `port` to any public address (an ipBlock 0.0.0.0/0, or no `to`)?"""
        egress = [p for p in policies if "Egress" in p["spec"].get("policyTypes", []) and self.matches(p["spec"].get("podSelector", {}), labels)]
        return not egress or any(
            self.port_ok(r, port) and (not r.get("to") or any(
                peer.get("ipBlock", {}).get("cidr") == "0.0.0.0/0" and not peer["ipBlock"].get("except") for peer in r["to"]))
            for p in egress for r in p["spec"].get("egress", []))

    def allows_to_address(self, policies: list, labels: dict, address: str, port: int) -> bool:
        """May a pod with these labels open TCP `port` to `address` (an ipBlock holding it, or no `to`)?"""
        ip = ipaddress.ip_address(address)
        def holds(block: dict) -> bool:
            try:
                return ip in ipaddress.ip_network(block.get("cidr", ""), strict=False) and not any(
                    ip in ipaddress.ip_network(e, strict=False) for e in block.get("except", []))
            except ValueError:
                return False
        egress = [p for p in policies if "Egress" in p["spec"].get("policyTypes", []) and self.matches(p["spec"].get("podSelector", {}), labels)]
        return not egress or any(
            self.port_ok(r, port) and (not r.get("to") or any("ipBlock" in peer and holds(peer["ipBlock"]) for peer in r["to"]))
            for p in egress for r in p["spec"].get("egress", []))

    # ---------------------------------------------------------------- overlays
    def check_overlay(self) -> None:
        deps = self.docs_of("Deployment")
        if self.overlay in PRODUCTION:
            self.check_production(deps)
        if self.overlay == "aws-eks":
            for svc in self.services:
                sa = self.get("ServiceAccount", svc)
                arn = (sa or {}).get("metadata", {}).get("annotations", {}).get(IRSA_ANNOTATION)
                if svc in IRSA and not (arn and IAM_ROLE.match(arn)):
                    self.fail(f"ServiceAccount {svc}: no IRSA role ({IRSA_ANNOTATION}), it calls AWS APIs")
                if svc not in IRSA and arn:
                    self.fail(f"ServiceAccount {svc}: has an IAM role but calls no AWS API")
            self.check_dynamodb_urls()
            ing = self.get("Ingress", "gateway")
            if ing:
                ann = ing["metadata"].get("annotations", {})
                self.check_health_check(ann.get("alb.ingress.kubernetes.io/healthcheck-port", "traffic-port"),
                                        ann.get("alb.ingress.kubernetes.io/healthcheck-path", "/"))
            cm = self.mercato_config()
            if cm.get("AWS_REGION") != "ap-south-1":
                self.fail("the aws-eks settings do not set AWS_REGION=ap-south-1")
            self.check_cognito_issuer(cm.get("MERCATO_AUTH__ISSUERS"))
        elif self.overlay == "gcp-gke":
            self.check_gke()
        elif self.overlay == "local":
            for d in deps:
                c = d["spec"]["template"]["spec"]["containers"][0]
                if c["image"] != "mercato:dev" or c.get("imagePullPolicy") != "IfNotPresent":
                    self.fail(f"Deployment {d['metadata']['name']}: image {c['image']} ({c.get('imagePullPolicy')}), expected mercato:dev (IfNotPresent)")
                if d["spec"].get("replicas") != 1:
                    self.fail(f"Deployment {d['metadata']['name']}: {d['spec'].get('replicas')} replicas; embedded stores need 1")
            for h in self.docs_of("HorizontalPodAutoscaler"):
                if h["spec"]["maxReplicas"] != 1:
                    self.fail(f"HorizontalPodAutoscaler {h['metadata']['name']} may scale past 1 replica on embedded stores")
            self.check_no_dynamodb()
        else:
            self.fail(f"unknown overlay (expected local, {' or '.join(PRODUCTION)})")

    def mercato_config(self) -> dict:
        """The data of the shared ConfigMap mercato-config (its name has a content hash)."""
        cm = next((c for c in self.docs_of("ConfigMap") if c["metadata"]["name"].startswith("mercato-config")), {})
        return cm.get("data", {})

    def check_no_dynamodb(self) -> None:
        for svc, url in self.database_urls().items():
            if url.startswith("dynamodb://"):
                self.fail(f"Deployment {svc}: MERCATO_{svc.upper()}__DATABASE_URL={url} on the {self.overlay} overlay, "
                          "which keeps no store in DynamoDB")

    def check_production(self, deps: list) -> None:
        """What both cloud overlays share: images by digest, no suppression left, Stripe, and an
        Ingress that reaches the gateway's service port only."""
        for d in deps:
            c = d["spec"]["template"]["spec"]["containers"][0]
            if not re.search(r"@sha256:[0-9a-f]{64}$", c["image"]):
                self.fail(f"Deployment {d['metadata']['name']}: image {c['image']} is not pinned by digest")
            skips = [k for k in d["metadata"].get("annotations", {}) if k.startswith("checkov.io/skip")]
            if skips:
                self.fail(f"Deployment {d['metadata']['name']}: checkov suppressions {skips} left in the production render")
        ing = self.get("Ingress", "gateway")
        if not ing:
            self.fail("no Ingress for the gateway")
        else:
            if len(self.docs_of("Ingress")) != 1:
                self.fail(f"Ingresses {sorted(self.by_kind['Ingress'])}: expected the gateway's alone")
            backends = [p["backend"]["service"] for r in ing["spec"].get("rules", []) for p in r["http"]["paths"]]
            if "defaultBackend" in ing["spec"]:
                backends.append(ing["spec"]["defaultBackend"].get("service", {}))
            if not backends or any(b.get("name") != "gateway" for b in backends):
                self.fail(f"Ingress gateway routes to {backends}, expected the gateway Service only")
            gw = self.get("Service", "gateway")
            names = {p.get("name"): p["port"] for p in (gw or {}).get("spec", {}).get("ports", [])}
            for b in backends:
                bp = b.get("port", {})
                if names.get(bp.get("name"), bp.get("number")) != self.ports["gateway"]:
                    self.fail(f"Ingress gateway routes to port {bp}, expected the gateway's service port {self.ports['gateway']}")
        self.check_payment_provider(deps)

    def check_health_check(self, port: object, path: object) -> None:
        """The load balancer's health check: on the gateway's service port (the only one open to
        it), for a path that listener serves."""
        gw = self.ports["gateway"]
        if str(port) not in ("traffic-port", str(gw)):
            self.fail(f"Ingress gateway: the load balancer's health check goes to port {port}; only the "
                      f"gateway's port {gw} is open to it")
        elif path not in self.facts.service_paths:
            self.fail(f"Ingress gateway: the load balancer's health check path {path!r} is not served on the "
                      f"gateway's port {gw} ({sorted(self.facts.service_paths)} besides the API)")

    def check_gke(self) -> None:
        """GKE: GKE's Ingress controller and load balancer, no AWS identity or store, the
        metadata server out of the services' reach."""
        ing = self.get("Ingress", "gateway")
        gw = self.get("Service", "gateway") or {}
        if ing:
            ann = ing["metadata"].get("annotations") or {}
            if ann.get("kubernetes.io/ingress.class") != "gce" or ing["spec"].get("ingressClassName"):
                self.fail(f"Ingress gateway: class annotation {ann.get('kubernetes.io/ingress.class')!r}, ingressClassName "
                          f"{ing['spec'].get('ingressClassName')!r}; GKE's controller takes kubernetes.io/ingress.class: gce "
                          "and no ingressClassName")
            if ann.get("kubernetes.io/ingress.allow-http") != "false":
                self.fail("Ingress gateway: kubernetes.io/ingress.allow-http is not \"false\" (HTTPS only)")
            certs = [c.strip() for c in ann.get("networking.gke.io/managed-certificates", "").split(",") if c.strip()]
            if not certs and not ann.get("ingress.gcp.kubernetes.io/pre-shared-cert"):
                self.fail("Ingress gateway: no certificate (networking.gke.io/managed-certificates or pre-shared-cert)")
            for name in certs:
                mc = self.get("ManagedCertificate", name)
                domains = (mc or {}).get("spec", {}).get("domains") or []
                if not domains or not all(re.fullmatch(r"(?=.{1,63}$)([a-z0-9-]+\.)+[a-z]{2,}", str(d)) for d in domains):
                    self.fail(f"Ingress gateway: ManagedCertificate {name} is not rendered with the shop's domain names ({domains})")
            fc = ann.get("networking.gke.io/v1beta1.FrontendConfig")
            if fc and not (self.get("FrontendConfig", fc) or {}).get("spec", {}).get("sslPolicy"):
                self.fail(f"Ingress gateway: FrontendConfig {fc} is not rendered with an sslPolicy")
            # The gateway Service is a ClusterIP Service: GKE's load balancer reaches it only through
            # network endpoint groups (container-native load balancing).
            sann = gw.get("metadata", {}).get("annotations") or {}
            try:
                neg = json.loads(sann.get("cloud.google.com/neg", "{}"))
            except ValueError:
                neg = {}
            if neg.get("ingress") is not True:
                self.fail(f"Service gateway: cloud.google.com/neg {sann.get('cloud.google.com/neg')!r} does not turn on "
                          "network endpoint groups for the Ingress (a ClusterIP Service needs them)")
            # The health check: the BackendConfig the Service names for its port, else GKE's own,
            # GET / on the serving port (the readiness probe is on the operations port, so GKE
            # cannot take its path from it).
            try:
                bc_ref = json.loads(sann.get("cloud.google.com/backend-config", "{}"))
            except ValueError:
                bc_ref = {}
            port_name = next((p.get("name") for p in gw.get("spec", {}).get("ports", [])), None)
            bc_name = (bc_ref.get("ports") or {}).get(port_name) or (bc_ref.get("ports") or {}).get(
                str(self.ports["gateway"])) or bc_ref.get("default")
            hc = {}
            if bc_name:
                bc = self.get("BackendConfig", bc_name)
                if bc is None:
                    self.fail(f"Service gateway names BackendConfig {bc_name}, which is not rendered")
                hc = (bc or {}).get("spec", {}).get("healthCheck") or {}
                if hc and hc.get("type", "HTTP") != "HTTP":
                    self.fail(f"BackendConfig {bc_name}: health check type {hc.get('type')}, the gateway serves plain HTTP")
            self.check_health_check(hc.get("port", "traffic-port"), hc.get("requestPath", "/"))
        for sa in self.docs_of("ServiceAccount"):
            if IRSA_ANNOTATION in (sa["metadata"].get("annotations") or {}):
                self.fail(f"ServiceAccount {sa['metadata']['name']}: an AWS role ({IRSA_ANNOTATION}) on GKE")
        self.check_no_dynamodb()
        cm = self.mercato_config()
        if "SQS_QUEUE_URL" in cm:
            self.fail("the gcp-gke settings set SQS_QUEUE_URL: no pod on GKE has AWS credentials")
        try:
            proxies = set(json.loads(cm.get("MERCATO_RATE_LIMIT__TRUSTED_PROXIES", "[]")))
        except (ValueError, TypeError):
            proxies = set()
        if not GOOGLE_FRONT_ENDS <= proxies:
            self.fail(f"MERCATO_RATE_LIMIT__TRUSTED_PROXIES {cm.get('MERCATO_RATE_LIMIT__TRUSTED_PROXIES')!r} does not trust "
                      f"Google's front ends {sorted(GOOGLE_FRONT_ENDS)}, the load balancer's side of the gateway's connections")
        # The metadata server hands out the node's credentials (or a bound Google service
        # account's): no Mercato pod calls it.
        policies = self.docs_of("NetworkPolicy")
        for svc in self.services:
            dep = self.get("Deployment", svc)
            if not dep:
                continue
            labels = dep["spec"]["template"]["metadata"].get("labels", {})
            for address, port in GKE_METADATA:
                if self.allows_to_address(policies, labels, address, port):
                    self.fail(f"NetworkPolicies allow {svc} -> GKE's metadata server {address}:{port}, which it never calls")

    def check_traces(self) -> None:
        """Every service sends its spans to a collector that exports them (see the module's doc)."""
        services = [s for s in self.services if self.get("Deployment", s)]
        exporter = COLLECTOR_EXPORTER.get(self.overlay)
        # Whatever the overlay: an OTLP endpoint names a Service of the render and one of its ports.
        for svc in services:
            env = self.environment(self.get("Deployment", svc)["spec"]["template"]["spec"]["containers"][0], f"Deployment {svc}")
            endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            if exporter:
                if endpoint != COLLECTOR_ENDPOINT:
                    self.fail(f"Deployment {svc}: OTEL_EXPORTER_OTLP_ENDPOINT is {endpoint!r}, expected {COLLECTOR_ENDPOINT!r} (the collector)")
                if env.get("OTEL_TRACES_SAMPLER") != "parentbased_traceidratio":
                    self.fail(f"Deployment {svc}: OTEL_TRACES_SAMPLER is {env.get('OTEL_TRACES_SAMPLER')!r}, expected "
                              "parentbased_traceidratio (a trace kept or dropped whole)")
                try:
                    ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", ""))
                except ValueError:
                    ratio = None
                if ratio is None or not 0 < ratio <= 1:
                    self.fail(f"Deployment {svc}: OTEL_TRACES_SAMPLER_ARG is {env.get('OTEL_TRACES_SAMPLER_ARG')!r}, expected a ratio in (0, 1]")
            if endpoint:
                url = urlsplit(endpoint)
                target = self.get("Service", url.hostname or "")
                ports = [p["port"] for p in (target or {}).get("spec", {}).get("ports", [])]
                if url.scheme != "http" or target is None or (url.port or 80) not in ports:
                    self.fail(f"Deployment {svc}: OTEL_EXPORTER_OTLP_ENDPOINT {endpoint!r} is not plain HTTP to a Service "
                              "of this overlay on a port it exposes")
        if not exporter:
            if self.get("Deployment", COLLECTOR):
                self.fail(f"Deployment {COLLECTOR} on an overlay without a collector")
            return

        dep, svc_obj = self.get("Deployment", COLLECTOR), self.get("Service", COLLECTOR)
        if not dep or not svc_obj or not self.get("ServiceAccount", COLLECTOR):
            self.fail(f"no Deployment, Service and ServiceAccount named {COLLECTOR} (the OpenTelemetry Collector)")
            return
        pod, where = dep["spec"]["template"], f"Deployment {COLLECTOR}"
        spec = pod["spec"]
        containers = spec.get("containers", [])
        if len(containers) != 1:
            self.fail(f"{where} has {len(containers)} containers, expected 1")
            return
        c = containers[0]
        if not c.get("image", "").startswith("otel/opentelemetry-collector-contrib:"):
            self.fail(f"{where}: image {c.get('image')}, expected otel/opentelemetry-collector-contrib:VERSION@sha256:...")
        named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}

        # The configuration it runs: --config=PATH, a key of a mounted ConfigMap.
        paths = [a.split("=", 1)[1] for a in c.get("args", []) if a.startswith("--config=")]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        config = None
        if len(paths) != 1:
            self.fail(f"{where}: args {c.get('args')} do not name one --config file")
        else:
            path = paths[0].removeprefix("file:")
            mount = next((m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
            vol = volumes.get(mount["name"]) if mount else None
            cm = self.get("ConfigMap", vol["configMap"]["name"]) if vol and "configMap" in vol else None
            key = path[len(mount["mountPath"].rstrip("/")) + 1:] if mount else None
            items = {i["path"]: i["key"] for i in (vol or {}).get("configMap", {}).get("items", [])}
            text = (cm or {}).get("data", {}).get(items.get(key, key))
            if text is None:
                self.fail(f"{where}: --config={path} is not a key of a mounted ConfigMap of this overlay")
            else:
                config = yaml.safe_load(text)
                for p in collector_config_problems(config, exporter):
                    self.fail(f"{where}: its configuration ({path}) {p}")

        # The Service reaches the OTLP receiver; the probes ask the health_check extension.
        sp = svc_obj["spec"].get("ports", [])
        target = [named.get(s.get("targetPort")) if isinstance(s.get("targetPort"), str) else s.get("targetPort", s["port"])
                  for s in sp if s["port"] == OTLP_HTTP_PORT]
        if target != [OTLP_HTTP_PORT]:
            self.fail(f"Service {COLLECTOR}: ports {sp}, expected {OTLP_HTTP_PORT} to the container's {OTLP_HTTP_PORT}")
        if svc_obj["spec"].get("selector") != {"app.kubernetes.io/name": COLLECTOR} \
                or pod["metadata"].get("labels", {}).get("app.kubernetes.io/name") != COLLECTOR:
            self.fail(f"Service {COLLECTOR} does not select the {COLLECTOR} pods by app.kubernetes.io/name")
        for probe in ("livenessProbe", "readinessProbe"):
            get = (c.get(probe) or {}).get("httpGet") or {}
            port = named.get(get.get("port")) if isinstance(get.get("port"), str) else get.get("port")
            if port != COLLECTOR_HEALTH_PORT:
                self.fail(f"{where}: {probe} {c.get(probe)} is not an HTTP GET on the health_check port {COLLECTOR_HEALTH_PORT}")

        # The same posture as the services' pods.
        psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
        if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")) or csc.get("readOnlyRootFilesystem") is not True \
                or csc.get("allowPrivilegeEscalation") is not False or "ALL" not in csc.get("capabilities", {}).get("drop", []) \
                or (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            self.fail(f"{where}: not non-root, read-only root, no privilege escalation, ALL capabilities dropped, RuntimeDefault seccomp")
        res = c.get("resources", {})
        if any(r not in res.get(k, {}) for k in ("requests", "limits") for r in ("cpu", "memory")):
            self.fail(f"{where}: requests and limits of cpu and memory are not all set")
        if spec.get("serviceAccountName") != COLLECTOR or spec.get("automountServiceAccountToken") is not False:
            self.fail(f"{where}: serviceAccountName {spec.get('serviceAccountName')!r}, automountServiceAccountToken "
                      f"{spec.get('automountServiceAccountToken')!r}; expected {COLLECTOR!r}, false")
        # Its cloud identity: the one thing it may call outside is its exporter's backend.
        sa_ann = self.get("ServiceAccount", COLLECTOR)["metadata"].get("annotations") or {}
        if exporter == "awsxray":
            if not IAM_ROLE.match(sa_ann.get(IRSA_ANNOTATION, "")):
                self.fail(f"ServiceAccount {COLLECTOR}: no IRSA role ({IRSA_ANNOTATION}), it calls X-Ray")
        if exporter == "googlecloud":
            gsa = sa_ann.get(WORKLOAD_IDENTITY, "")
            if not GSA_EMAIL.match(gsa):
                self.fail(f"ServiceAccount {COLLECTOR}: {WORKLOAD_IDENTITY} is {gsa!r}, not a Google service account's "
                          "email (Workload Identity: it calls Cloud Trace)")
            if IRSA_ANNOTATION in sa_ann:
                self.fail(f"ServiceAccount {COLLECTOR}: an AWS role ({IRSA_ANNOTATION}) on a collector exporting to Cloud Trace")
            # Only a node running GKE's metadata server gives the pod its bound account's tokens.
            selector = spec.get("nodeSelector", {})
            if any(selector.get(k) != v for k, v in GKE_METADATA_NODES.items()):
                self.fail(f"{where}: nodeSelector {selector} does not ask for nodes running GKE's metadata server "
                          f"{GKE_METADATA_NODES} (elsewhere Workload Identity gives it no tokens)")
            for other in self.docs_of("ServiceAccount"):
                name = other["metadata"]["name"]
                if name != COLLECTOR and WORKLOAD_IDENTITY in (other["metadata"].get("annotations") or {}):
                    self.fail(f"ServiceAccount {name}: bound to a Google service account ({WORKLOAD_IDENTITY}), "
                              "but only the collector calls a Google API")

        # NetworkPolicies: the services (and nothing from outside) reach 4318; the collector
        # reaches HTTPS outside and none of the services.
        policies = self.docs_of("NetworkPolicy")
        pods = {s: self.get("Deployment", s)["spec"]["template"]["metadata"].get("labels", {}) for s in services}
        pods[COLLECTOR] = pod["metadata"].get("labels", {})
        for s in services:
            if not self.allows(policies, pods, s, COLLECTOR, OTLP_HTTP_PORT):
                self.fail(f"NetworkPolicies block {s} -> {COLLECTOR}:{OTLP_HTTP_PORT}, its spans")
            for port in (self.ports[s], self.ops_port):
                if self.allows(policies, pods, COLLECTOR, s, port):
                    self.fail(f"NetworkPolicies allow {COLLECTOR} -> {s}:{port}, which the collector never calls")
        if self.allows_from_outside(policies, pods[COLLECTOR], OTLP_HTTP_PORT, any_rule=True):
            self.fail(f"NetworkPolicies admit traffic from outside the cluster to {COLLECTOR}:{OTLP_HTTP_PORT}")
        if not self.allows_to_outside(policies, pods[COLLECTOR], OUTSIDE_HTTPS):
            self.fail(f"NetworkPolicies block {COLLECTOR} -> outside:{OUTSIDE_HTTPS}, its exporter's backend")
        if exporter == "googlecloud":
            for address, port in GKE_METADATA:
                if not self.allows_to_address(policies, pods[COLLECTOR], address, port):
                    self.fail(f"NetworkPolicies block {COLLECTOR} -> GKE's metadata server {address}:{port} "
                              "(its Workload Identity tokens and the project id)")

    def check_payment_provider(self, deps: list) -> None:
        """Production takes real money: environment production (the simulator refuses to start
        there), Stripe as the provider, its keys files of the mercato-stripe Secret that only the
        payments pods mount."""
        for d in deps:
            name = d["metadata"]["name"]
            spec = d["spec"]["template"]["spec"]
            c = spec["containers"][0]
            env = self.environment(c, f"Deployment {name}")
            mounts_stripe = any(v.get("secret", {}).get("secretName") == STRIPE_SECRET for v in spec.get("volumes", []))
            if name != "payments":
                if mounts_stripe:
                    self.fail(f"Deployment {name}: mounts the Secret {STRIPE_SECRET}, which only payments needs")
                continue
            if env.get("MERCATO_ENVIRONMENT") != "production":
                self.fail(f"Deployment payments: MERCATO_ENVIRONMENT={env.get('MERCATO_ENVIRONMENT')!r}, expected production")
            if env.get("MERCATO_PAYMENTS__PROVIDER") != "stripe":
                self.fail(f"Deployment payments: MERCATO_PAYMENTS__PROVIDER={env.get('MERCATO_PAYMENTS__PROVIDER')!r}, "
                          "expected stripe (the simulator takes no money)")
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            for key, item in STRIPE_FILES.items():
                path = env.get(key)
                if path is None or self.secret_file(path, mounts, volumes) != (STRIPE_SECRET, item):
                    self.fail(f"Deployment payments: {key}={path!r} is not the key {item} of the mounted Secret {STRIPE_SECRET}")

    def check_cognito_issuer(self, value: str | None) -> None:
        """MERCATO_AUTH__ISSUERS names the Cognito user pool as Cognito's access tokens need it."""
        key = "MERCATO_AUTH__ISSUERS"
        if value is None:
            self.fail(f"the aws-eks settings do not set {key} (the Cognito user pool as a token issuer)")
            return
        try:
            issuers = tomllib.loads(f"issuers = {value}")["issuers"]
        except tomllib.TOMLDecodeError as e:
            self.fail(f"{key} is not a TOML inline array: {e}")
            return
        if not isinstance(issuers, list) or not all(isinstance(i, dict) for i in issuers):
            self.fail(f"{key} is not an array of inline tables: {value}")
            return
        cognito = [i for i in issuers if COGNITO_ISSUER.fullmatch(str(i.get("issuer", "")))]
        if len(cognito) != 1:
            self.fail(f"{key} names {len(cognito)} Cognito user pools, expected 1: {value}")
            return
        c = cognito[0]
        if COGNITO_ISSUER.fullmatch(c["issuer"]).group(1) != REGION:
            self.fail(f"{key}: the Cognito issuer {c['issuer']} is not in {REGION}")
        for field, expected in (("jwks_url", f"{c['issuer']}/.well-known/jwks.json"),
                                ("audience_claim", "client_id"), ("roles_claim", "cognito:groups")):
            if c.get(field) != expected:
                self.fail(f"{key}: the Cognito issuer's {field} is {c.get(field)!r}, expected {expected!r}")
        if not re.fullmatch(r"[0-9a-z]{1,128}", str(c.get("audience", ""))):
            self.fail(f"{key}: the Cognito issuer's audience {c.get('audience')!r} is not an app client id")
        if not c.get("admin_roles") or not isinstance(c["admin_roles"], list):
            self.fail(f"{key}: the Cognito issuer has no admin_roles (the user pool's admin group)")
        unknown = set(c) - {"issuer", "jwks_url", "audience", "audience_claim", "roles_claim", "admin_roles"}
        if unknown:
            self.fail(f"{key}: unknown fields {sorted(unknown)} in the Cognito issuer")

    def database_urls(self) -> dict[str, str]:
        """Each service's own database URL (MERCATO_<SERVICE>__DATABASE_URL) as its pod sees it."""
        urls = {}
        for svc in self.services:
            dep = self.get("Deployment", svc)
            if not dep or len(dep["spec"]["template"]["spec"].get("containers", [])) != 1:
                continue
            env = self.environment(dep["spec"]["template"]["spec"]["containers"][0], f"Deployment {svc}")
            if f"MERCATO_{svc.upper()}__DATABASE_URL" in env:
                urls[svc] = env[f"MERCATO_{svc.upper()}__DATABASE_URL"]
        return urls

    def check_dynamodb_urls(self) -> None:
        urls = self.database_urls()
        for svc in self.services:
            key = f"MERCATO_{svc.upper()}__DATABASE_URL"
            url = urls.get(svc)
            if svc in DYNAMODB:
                m = re.fullmatch(r"dynamodb://([A-Za-z0-9_.-]{3,255})\?region=([a-z0-9-]+)", url or "")
                if not m:
                    self.fail(f"Deployment {svc}: {key} is {url!r}, expected dynamodb://TABLE?region={REGION} (its store is DynamoDB on EKS, no endpoint)")
                    continue
                table, region = m.groups()
                if region != REGION:
                    self.fail(f"Deployment {svc}: {key} names region {region}, expected {REGION}")
                if table != svc and not table.endswith(f"-{svc}"):
                    self.fail(f"Deployment {svc}: {key} names table {table}, not the {svc} table (<prefix>-{svc})")
                if svc not in IRSA:
                    self.fail(f"Deployment {svc}: a DynamoDB store without an IRSA role")
            elif url and url.startswith("dynamodb://"):
                self.fail(f"Deployment {svc}: {key}={url}, but only {sorted(DYNAMODB)} keep their data in DynamoDB")

    def run(self) -> list[str]:
        names = {d for d in self.by_kind.get("Deployment", {})}
        if self.overlay in COLLECTOR_EXPORTER:
            names.discard(COLLECTOR)
        for extra in sorted(names - set(self.services)):
            self.fail(f"Deployment {extra} is not a service of the binary {self.services}")
        for svc in self.services:
            self.check_service(svc)
        self.check_references()
        self.check_network_policies()
        self.check_overlay()
        self.check_traces()
        return self.problems


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    facts = Facts()
    services = facts.services
    problems, summary = [], []
    for arg in argv:
        overlay, _, path = arg.partition("=")
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        problems += Checker(overlay, docs, facts).run()
        summary.append(f"{overlay} {len(docs)} objects")
    for path, exporter in COLLECTOR_FILES.items():
        problems += [f"{path} {p}" for p in collector_config_problems(yaml.safe_load(source(path)), exporter)]
    if problems:
        print("\n".join(f"test_manifests: {p}" for p in problems), file=sys.stderr)
        print(f"test_manifests: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"test_manifests: {', '.join(summary)}: {len(services)} services ({', '.join(services)}) "
          f"checked against the binary's ports and routes (service listeners {sorted(facts.service_paths)}, "
          f"operations listener :{facts.ops_port} {sorted(facts.ops_paths)}); keys from {AUTH_SECRET} "
          f"(signing key: {', '.join(sorted(SIGNS_TOKENS))}; service key: all but {', '.join(sorted(NO_SERVICE_KEY))}); "
          f"NetworkPolicies allow exactly {len(CALLS)} calls + {len(JWKS_CALLS - CALLS)} JWKS reads, Prometheus alone "
          f"on :{facts.ops_port}, and HTTPS out (the token issuers' JWKS) for every service; traces over OTLP/HTTP to "
          f"{COLLECTOR}:{OTLP_HTTP_PORT} on {', '.join(f'{o} ({e})' for o, e in COLLECTOR_EXPORTER.items())}"
          + "".join(f", {Path(p).name} ({e}) checked too" for p, e in COLLECTOR_FILES.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
