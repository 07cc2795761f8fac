"""The cluster's network as a pod sees it: NetworkPolicy and, where a destination has an Istio sidecar, Istio's
PeerAuthentication and AuthorizationPolicy, evaluated for every connection a pod opens.

Each service a test starts (the real MLflow server, the S3 endpoint, the fake Kubernetes API) is reached through a
proxy per pod and service, on a loopback address of its own (the whole 127.0.0.0/8 is loopback on Linux): `attach`
returns the /etc/hosts entries that make the pod's in-cluster names resolve to its proxies, and each proxy knows whose
connections it carries. A connection the rules refuse is closed at once and recorded in `denied`; an allowed one is
forwarded to the upstream. Connections between pods (torchrun's rendezvous and gloo between TrainJob nodes) are
checked with `allowed` before the nodes start. Pods are duck-typed: anything with name, namespace and labels (and
optionally service_account). A proxy listens on the Service's own port, so a port below 1024 (the API server's 443)
needs root, as the suite has in CI.

The rules, and where they come from:
- NetworkPolicy (kubernetes/kubernetes pkg/apis/networking/types.go): a pod is isolated for ingress (egress) iff some
  policy of its namespace selects it with that policy type (policyTypes defaults to Ingress, plus Egress when the
  policy has egress rules); an isolated pod admits a connection iff some rule of some selecting policy admits the
  peer and the port. A peer is a podSelector (pods of the policy's namespace), a namespaceSelector (all pods of the
  selected namespaces), both (pods matching the podSelector in the selected namespaces: AND), or an ipBlock; a rule
  without peers admits every peer, one without ports every port. Both ends apply: the source's egress and the
  destination's ingress.
- Istio sidecar injection (istio/istio pkg/kube/inject/webhook.go, injectRequired): a pod gets a sidecar when its
  namespace is labelled istio-injection=enabled (or istio.io/rev) and the pod does not carry
  sidecar.istio.io/inject=false. Only a sidecar enforces PeerAuthentication and AuthorizationPolicy, and only a
  source with a sidecar has an mTLS identity (principal cluster.local/ns/<namespace>/sa/<service account>).
- PeerAuthentication (istio.io security/v1): the workload's own policy, else its namespace's, else the root
  namespace's (istio-system), else PERMISSIVE; STRICT refuses a plaintext connection (a source without sidecar).
- AuthorizationPolicy (istio.io security/v1): DENY policies first (any matching rule refuses), then ALLOW: when any
  ALLOW policy applies to the workload, a request is admitted only if one of their rules matches. Principals,
  namespaces and source.namespace/source.principal conditions need the mTLS identity, so they never match a source
  without sidecar. Request attributes (headers, paths, methods) are those of the request a test declares (none by
  default: the clients here send no kubeflow-userid header).
"""

from __future__ import annotations

import errno
import fnmatch
import ipaddress
import itertools
import random
import select
import socket
import threading
from dataclasses import dataclass, field

ROOT_NAMESPACE = "istio-system"  # Istio's root namespace: its policies apply mesh-wide
ISTIO_INJECT = "sidecar.istio.io/inject"


# --- label selectors (k8s.io/apimachinery pkg/apis/meta/v1 LabelSelector) ---------------------------------------


def selects(selector: dict | None, labels: dict[str, str] | None) -> bool:
    """A LabelSelector against labels: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist), ANDed;
    an empty selector selects everything. `labels` None (no pod, e.g. the API server) is selected by nothing."""
    if labels is None:
        return False
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        ok = {"In": lambda: key in labels and labels[key] in values,
              "NotIn": lambda: key not in labels or labels[key] not in values,
              "Exists": lambda: key in labels,
              "DoesNotExist": lambda: key not in labels}[operator]()
        if not ok:
            return False
    return True


# --- NetworkPolicy ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod (labels) in a namespace, or something that is no pod (labels None: the API
    server), with an IP when an ipBlock must be able to match it."""
    namespace: str
    labels: dict[str, str] | None
    ip: str | None = None
    service_account: str | None = None


def _policy_types(policy: dict) -> set[str]:
    spec = policy.get("spec") or {}
    if spec.get("policyTypes"):
        return set(spec["policyTypes"])
    return {"Ingress"} | ({"Egress"} if spec.get("egress") else set())


def _port_matches(ports: list[dict] | None, port: int, protocol: str = "TCP") -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        first = p["port"]
        if isinstance(first, str):
            raise NotImplementedError(f"named port {first!r}: the emulator checks port numbers only")
        if first <= port <= p.get("endPort", first):
            return True
    return False


def _ip_matches(block: dict, ip: str | None) -> bool:
    if ip is None:
        return False
    address = ipaddress.ip_address(ip)
    if address not in ipaddress.ip_network(block["cidr"], strict=False):
        return False
    return not any(address in ipaddress.ip_network(e, strict=False) for e in block.get("except") or [])


class Network:
    """NetworkPolicy (and Istio) evaluation over rendered objects, and the per-pod proxies that apply it."""

    def __init__(self, objects: list[dict], namespaces: dict[str, dict[str, str]]):
        self.namespaces = {n: {"kubernetes.io/metadata.name": n, **labels} for n, labels in namespaces.items()}
        self.network_policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
        self.authorization_policies = [o for o in objects if o.get("kind") == "AuthorizationPolicy"]
        self.peer_authentications = [o for o in objects if o.get("kind") == "PeerAuthentication"]
        for policy in self.network_policies + self.authorization_policies + self.peer_authentications:
            if not policy.get("metadata", {}).get("namespace"):
                raise ValueError(f"{policy['kind']}/{policy['metadata']['name']} has no namespace")
        self.services: dict[str, _Service] = {}
        self.denied: list[str] = []
        # loopback addresses for the proxies, from a random start so that networks of concurrent test processes
        # rarely meet (a taken address:port is skipped)
        first = random.randrange(64, 128)
        self._addresses = (f"127.{a}.{b}.{c}" for a, b, c in itertools.product(
            [*range(first, 128), *range(64, first)], range(256), range(1, 255)))
        self._proxies: list[_Proxy] = []
        self._lock = threading.Lock()

    # --- the rules ---------------------------------------------------------------------------------------------

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        if namespace not in self.namespaces:
            raise KeyError(f"namespace {namespace!r} does not exist in this install")
        return self.namespaces[namespace]

    def _peer_matches(self, peer: dict, policy_namespace: str, other: Endpoint) -> bool:
        if "ipBlock" in peer:
            return _ip_matches(peer["ipBlock"], other.ip)
        if other.labels is None:  # no pod: only an ipBlock can name it
            return False
        if "namespaceSelector" in peer:
            in_namespace = selects(peer["namespaceSelector"], self.namespace_labels(other.namespace))
        else:
            in_namespace = other.namespace == policy_namespace
        return in_namespace and ("podSelector" not in peer or selects(peer["podSelector"], other.labels))

    def _isolation(self, pod: Endpoint, direction: str, other: Endpoint, port: int) -> tuple[bool, str]:
        """Whether `pod`'s policies of `direction` (Ingress: other → pod; Egress: pod → other) admit the
        connection, and which policies decided it."""
        selecting = [p for p in self.network_policies
                     if p["metadata"]["namespace"] == pod.namespace and direction in _policy_types(p)
                     and selects((p.get("spec") or {}).get("podSelector"), pod.labels)]
        if not selecting:
            return True, f"no {direction} NetworkPolicy selects it"
        rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for policy in selecting:
            for rule in policy["spec"].get(rules_key) or []:
                if not _port_matches(rule.get("ports"), port):
                    continue
                peers = rule.get(peers_key)
                if not peers or any(self._peer_matches(peer, pod.namespace, other) for peer in peers):
                    return True, f"NetworkPolicy {pod.namespace}/{policy['metadata']['name']} admits it"
        names = ", ".join(f"{pod.namespace}/{p['metadata']['name']}" for p in selecting)
        return False, f"{direction} NetworkPolicies {names} select the pod and no rule admits it on port {port}"

    def has_sidecar(self, namespace: str, labels: dict[str, str] | None) -> bool:
        """Istio's injection decision (istio/istio pkg/kube/inject/webhook.go injectRequired, sidecar mode)."""
        if labels is None:
            return False
        ns = self.namespace_labels(namespace)
        enabled = ns.get("istio-injection") == "enabled" or ("istio.io/rev" in ns and "istio-injection" not in ns)
        if labels.get(ISTIO_INJECT) == "false":
            return False
        return enabled or labels.get(ISTIO_INJECT) == "true"

    def _mtls_mode(self, dst: Endpoint, port: int) -> str:
        """The PeerAuthentication mode at the destination: the workload's policy (a selector matching it), else
        its namespace's (no selector), else the root namespace's, else PERMISSIVE; portLevelMtls overrides."""
        def workload(p):
            selector = (p.get("spec") or {}).get("selector")
            return p["metadata"]["namespace"] == dst.namespace and bool(selector) and selects(selector, dst.labels)

        def namespace_wide(namespace):
            return lambda p: p["metadata"]["namespace"] == namespace and not (p.get("spec") or {}).get("selector")

        for scope in (workload, namespace_wide(dst.namespace), namespace_wide(ROOT_NAMESPACE)):
            for policy in filter(scope, self.peer_authentications):
                spec = policy.get("spec") or {}
                levels = spec.get("portLevelMtls") or {}
                mode = (levels.get(port) or levels.get(str(port)) or spec.get("mtls") or {}).get("mode", "UNSET")
                if mode != "UNSET":
                    return mode
        return "PERMISSIVE"

    def _istio(self, src: Endpoint, dst: Endpoint, port: int, request: dict) -> tuple[bool, str]:
        """Sidecar-side checks at the destination: PeerAuthentication, then AuthorizationPolicy."""
        mode = self._mtls_mode(dst, port)
        mtls = self.has_sidecar(src.namespace, src.labels) and mode != "DISABLE"
        if mode == "STRICT" and not mtls:
            return False, "PeerAuthentication STRICT at the destination refuses plaintext from a pod without sidecar"
        identity = None
        if mtls:
            identity = {"namespace": src.namespace,
                        "principal": f"cluster.local/ns/{src.namespace}/sa/{src.service_account or 'default'}"}
        policies = [p for p in self.authorization_policies
                    if p["metadata"]["namespace"] in (dst.namespace, ROOT_NAMESPACE)
                    and (not (p.get("spec") or {}).get("selector")
                         or selects(p["spec"]["selector"], dst.labels))]
        for policy in policies:
            if (policy.get("spec") or {}).get("action") == "DENY" and self._any_rule(policy, identity, port, request):
                return False, f"AuthorizationPolicy {_name(policy)} (DENY) matches"
        allow = [p for p in policies if (p.get("spec") or {}).get("action", "ALLOW") == "ALLOW"]
        if not allow:
            return True, "no ALLOW AuthorizationPolicy applies"
        for policy in allow:
            if self._any_rule(policy, identity, port, request):
                return True, f"AuthorizationPolicy {_name(policy)} admits it"
        who = identity["principal"] if identity else "a source without mTLS identity (no sidecar)"
        return False, (f"AuthorizationPolicies {', '.join(_name(p) for p in allow)} apply and none admits {who} "
                       f"on port {port}")

    def _any_rule(self, policy: dict, identity: dict | None, port: int, request: dict) -> bool:
        return any(self._rule_matches(rule or {}, identity, port, request)
                   for rule in (policy.get("spec") or {}).get("rules") or [])

    @staticmethod
    def _rule_matches(rule: dict, identity: dict | None, port: int, request: dict) -> bool:
        def match(patterns, value):  # Istio string match: exact, prefix*, *suffix, * (present)
            return value is not None and any(fnmatch.fnmatchcase(value, p) if "*" in p else value == p
                                             for p in patterns)

        principal = identity["principal"] if identity else None
        namespace = identity["namespace"] if identity else None
        if rule.get("from"):
            def source_ok(source):
                checks = [("principals", principal), ("namespaces", namespace)]
                for key, value in checks:
                    if key in source and not match(source[key], value):
                        return False
                    if f"not{key.title()}" in source and match(source[f"not{key.title()}"], value):
                        return False
                unsupported = set(source) - {"principals", "namespaces", "notPrincipals", "notNamespaces"}
                if unsupported:
                    raise NotImplementedError(f"AuthorizationPolicy source fields {sorted(unsupported)}")
                return True
            if not any(source_ok(f.get("source") or {}) for f in rule["from"]):
                return False
        if rule.get("to"):
            def operation_ok(operation):
                if "ports" in operation and str(port) not in [str(p) for p in operation["ports"]]:
                    return False
                if "notPorts" in operation and str(port) in [str(p) for p in operation["notPorts"]]:
                    return False
                for key, attribute in (("paths", "path"), ("methods", "method"), ("hosts", "host")):
                    if key in operation and not match(operation[key], request.get(attribute)):
                        return False
                return True
            if not any(operation_ok(t.get("operation") or {}) for t in rule["to"]):
                return False
        for condition in rule.get("when") or []:
            key = condition["key"]
            if key == "source.namespace":
                value = namespace
            elif key == "source.principal":
                value = principal
            elif key == "destination.port":
                value = str(port)
            elif key.startswith("request.headers[") and key.endswith("]"):
                value = (request.get("headers") or {}).get(key[len("request.headers["):-1].lower())
            else:
                raise NotImplementedError(f"AuthorizationPolicy condition key {key!r}")
            if "values" in condition and not match(condition["values"], value):
                return False
            if "notValues" in condition and match(condition["notValues"], value):
                return False
        return True

    def allowed(self, src_namespace: str, src_labels: dict[str, str] | None, dst_namespace: str,
                dst_labels: dict[str, str] | None, port: int, *, src_service_account: str | None = None,
                src_ip: str | None = None, dst_ip: str | None = None,
                request: dict | None = None) -> tuple[bool, str]:
        """Whether a connection from a pod to a pod (or to something that is no pod: labels None) on `port` gets
        through, and why: the source's egress policies, the destination's ingress policies, and, when the
        destination has a sidecar, its PeerAuthentication and AuthorizationPolicies."""
        src = Endpoint(src_namespace, src_labels, src_ip, src_service_account)
        dst = Endpoint(dst_namespace, dst_labels, dst_ip)
        self.namespace_labels(src_namespace)
        ok, why = self._isolation(src, "Egress", dst, port)
        if not ok:
            return False, f"egress of {src_namespace}: {why}"
        if dst_labels is not None:
            ok, why_in = self._isolation(dst, "Ingress", src, port)
            if not ok:
                return False, f"ingress of {dst_namespace}: {why_in}"
            if self.has_sidecar(dst_namespace, dst_labels):
                ok, why_istio = self._istio(src, dst, port, request or {})
                if not ok:
                    return False, f"Istio at {dst_namespace}: {why_istio}"
        return True, "allowed"

    # --- services and proxies ------------------------------------------------------------------------------------

    def add_service(self, host: str, port: int, namespace: str, labels: dict[str, str] | None,
                    upstream: tuple[str, int], *, ip: str | None = None):
        """A Service `host` (its cluster FQDN, e.g. mlflow.posttrain.svc.cluster.local) on `port`, whose pods
        (labels; None: no pod, e.g. the API server, then `ip` is what an ipBlock would see) are really `upstream`."""
        self.namespace_labels(namespace)
        self.services[host] = _Service(host, port, namespace, labels, upstream, ip)

    def attach(self, pod) -> dict[str, str]:
        """Start a proxy per service for this pod, each on its own loopback address; return the pod's /etc/hosts
        entries (every name the pod may use for a service → that proxy's address)."""
        self.namespace_labels(pod.namespace)
        hosts = {}
        for service in self.services.values():
            while True:
                with self._lock:
                    address = next(self._addresses)
                try:
                    proxy = _Proxy(self, pod, service, address)
                    break
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:
                        raise
            self._proxies.append(proxy)
            for name in service.names(pod.namespace):
                hosts[name] = address
        return hosts

    def check(self, pod, service: _Service) -> tuple[bool, str]:
        return self.allowed(pod.namespace, pod.labels, service.namespace, service.labels, service.port,
                            src_service_account=getattr(pod, "service_account", None), dst_ip=service.ip)

    def refuse(self, message: str):
        with self._lock:
            self.denied.append(message)

    def close(self):
        for proxy in self._proxies:
            proxy.close()
        self._proxies.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc):
        self.close()


def _name(policy: dict) -> str:
    return f"{policy['metadata']['namespace']}/{policy['metadata']['name']}"


@dataclass
class _Service:
    host: str
    port: int
    namespace: str
    labels: dict[str, str] | None
    upstream: tuple[str, int]
    ip: str | None = None

    def names(self, from_namespace: str) -> list[str]:
        """The names a pod resolves to this Service: the FQDN and the shorter forms its DNS search path
        (<namespace>.svc.cluster.local svc.cluster.local cluster.local) completes."""
        name = self.host.split(".")[0]
        names = [f"{name}.{self.namespace}.svc.cluster.local", f"{name}.{self.namespace}.svc",
                 f"{name}.{self.namespace}"]
        if from_namespace == self.namespace:
            names.append(name)
        return names


@dataclass
class _Proxy:
    network: Network
    pod: object
    service: _Service
    address: str
    _threads: list = field(default_factory=list)

    def __post_init__(self):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.bind((self.address, self.service.port))
        except OSError:
            self._listener.close()
            raise
        self._listener.listen(64)
        self._closed = threading.Event()
        thread = threading.Thread(target=self._accept, daemon=True,
                                  name=f"proxy {self.pod.namespace}/{self.pod.name} → {self.service.host}")
        thread.start()

    def _accept(self):
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            ok, why = self.network.check(self.pod, self.service)
            if not ok:
                self.network.refuse(f"{self.pod.namespace}/{self.pod.name} → {self.service.host}:"
                                    f"{self.service.port}: {why}")
                client.close()
                continue
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket):
        try:
            upstream = socket.create_connection(self.service.upstream, timeout=30)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        sockets = [client, upstream]
        try:
            while not self._closed.is_set():
                readable, _, _ = select.select(sockets, [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def close(self):
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
