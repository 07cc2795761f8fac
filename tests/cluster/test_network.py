"""tests/cluster/network.py: each NetworkPolicy, sidecar-injection, PeerAuthentication and AuthorizationPolicy rule
as its upstream defines it (the module names the files), on small hand-made policies; and the per-pod proxies, which
forward an allowed connection and close a denied one at once, recording why."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest

from .network import Network, selects

NAMESPACES = {"a": {"team": "a"}, "b": {"team": "b"}, "mesh": {"istio-injection": "enabled"}}


def _np(name, namespace, pod_selector, *, ingress=None, egress=None, types=None):
    spec = {"podSelector": pod_selector}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types:
        spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


DB = {"app": "db"}
WEB = {"app": "web"}


def test_selector_semantics():
    assert selects({}, {"x": "1"}) and selects(None, {})
    assert not selects({}, None)  # no pod
    assert selects({"matchLabels": {"x": "1"}}, {"x": "1", "y": "2"})
    assert not selects({"matchLabels": {"x": "1"}}, {"x": "2"})
    expression = {"matchExpressions": [{"key": "x", "operator": "In", "values": ["1", "2"]}]}
    assert selects(expression, {"x": "2"}) and not selects(expression, {})
    assert selects({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["1"]}]}, {})
    assert not selects({"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}, {"x": ""})


def test_a_pod_no_policy_selects_is_open():
    net = Network([_np("db", "a", {"matchLabels": DB}, ingress=[])], NAMESPACES)
    assert net.allowed("b", WEB, "a", WEB, 80)[0]  # the policy selects db pods only


def test_selected_pod_admits_only_what_a_rule_admits():
    ingress = [{"from": [{"podSelector": {"matchLabels": WEB}}], "ports": [{"port": 5432}]}]
    net = Network([_np("db", "a", {"matchLabels": DB}, ingress=ingress)], NAMESPACES)
    assert net.allowed("a", WEB, "a", DB, 5432) == (True, "allowed")
    ok, why = net.allowed("a", WEB, "a", DB, 5433)
    assert not ok and "a/db" in why and "5433" in why
    assert not net.allowed("a", {"app": "other"}, "a", DB, 5432)[0]
    # a podSelector alone selects pods of the policy's own namespace only
    assert not net.allowed("b", WEB, "a", DB, 5432)[0]


def test_namespace_and_pod_selector_in_one_peer_are_anded():
    both = [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": WEB}}]}]
    net = Network([_np("db", "a", {"matchLabels": DB}, ingress=both)], NAMESPACES)
    assert net.allowed("b", WEB, "a", DB, 1)[0]
    assert not net.allowed("b", {"app": "x"}, "a", DB, 1)[0]
    assert not net.allowed("a", WEB, "a", DB, 1)[0]  # namespace a is not team b
    either = [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}, {"podSelector": {"matchLabels": WEB}}]}]
    net = Network([_np("db", "a", {"matchLabels": DB}, ingress=either)], NAMESPACES)
    assert net.allowed("b", {"app": "x"}, "a", DB, 1)[0] and net.allowed("a", WEB, "a", DB, 1)[0]


def test_namespace_selector_sees_the_automatic_name_label():
    peer = [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}]}]
    net = Network([_np("db", "a", {"matchLabels": DB}, ingress=peer)], NAMESPACES)
    assert net.allowed("b", WEB, "a", DB, 1)[0] and not net.allowed("a", WEB, "a", DB, 1)[0]


def test_empty_rule_admits_all_and_empty_list_admits_none():
    assert Network([_np("db", "a", {}, ingress=[{}])], NAMESPACES).allowed("b", WEB, "a", DB, 9)[0]
    assert not Network([_np("db", "a", {}, ingress=[])], NAMESPACES).allowed("b", WEB, "a", DB, 9)[0]


def test_any_selecting_policy_may_admit():
    first = _np("one", "a", {}, ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "x"}}}]}])
    second = _np("two", "a", {"matchLabels": DB}, ingress=[{"from": [{"podSelector": {"matchLabels": WEB}}]}])
    net = Network([first, second], NAMESPACES)
    assert net.allowed("a", WEB, "a", DB, 1)[0] and net.allowed("a", {"app": "x"}, "a", DB, 1)[0]
    assert not net.allowed("a", WEB, "a", {"app": "other"}, 1)[0]


def test_egress_of_the_source_applies_too():
    deny_out = _np("lockdown", "b", {"matchLabels": WEB}, egress=[{"to": [{"podSelector": {}}]}],
                   types=["Egress"])
    net = Network([deny_out], NAMESPACES)
    assert net.allowed("b", WEB, "b", DB, 1)[0]
    ok, why = net.allowed("b", WEB, "a", DB, 1)  # egress admits pods of namespace b only
    assert not ok and why.startswith("egress of b")
    # only Ingress by default: a policy with ingress rules and no policyTypes does not isolate egress
    assert Network([_np("x", "b", {}, ingress=[])], NAMESPACES).allowed("b", WEB, "a", DB, 1)[0]


def test_something_that_is_no_pod_matches_ip_blocks_only():
    egress = [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}], "ports": [{"port": 443}]}]
    net = Network([_np("api", "a", {}, egress=egress, types=["Egress"])], NAMESPACES)
    assert net.allowed("a", WEB, "default", None, 443, dst_ip="10.0.0.1")[0]
    assert not net.allowed("a", WEB, "default", None, 443, dst_ip="10.1.0.1")[0]
    assert not net.allowed("a", WEB, "default", None, 443)[0]


def test_port_ranges():
    ingress = [{"ports": [{"port": 29400, "endPort": 29500, "protocol": "TCP"}]}]
    net = Network([_np("nodes", "a", {}, ingress=ingress)], NAMESPACES)
    assert net.allowed("a", WEB, "a", DB, 29500)[0] and not net.allowed("a", WEB, "a", DB, 29501)[0]


# --- Istio --------------------------------------------------------------------------------------------------


def _ap(name, namespace, rules, *, action=None, selector=None):
    spec = {"rules": rules}
    if action:
        spec["action"] = action
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def _pa(namespace, mode, selector=None):
    spec = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": namespace}, "spec": spec}


NO_SIDECAR = {"app": "step", "sidecar.istio.io/inject": "false"}
SAME_NAMESPACE = [{"when": [{"key": "source.namespace", "values": ["mesh"]}]}]


def test_sidecar_injection_follows_the_namespace_label_and_the_pod_opt_out():
    net = Network([], NAMESPACES)
    assert net.has_sidecar("mesh", WEB) and not net.has_sidecar("mesh", NO_SIDECAR)
    assert not net.has_sidecar("a", WEB) and not net.has_sidecar("mesh", None)


def test_authorization_policy_needs_an_identity_a_pod_without_sidecar_lacks():
    net = Network([_ap("owner", "mesh", SAME_NAMESPACE)], NAMESPACES)
    assert net.allowed("mesh", WEB, "mesh", DB, 80, src_service_account="default-editor")[0]
    ok, why = net.allowed("mesh", NO_SIDECAR, "mesh", DB, 80)
    assert not ok and "without mTLS identity" in why
    # a destination without sidecar enforces nothing of Istio's
    assert net.allowed("mesh", NO_SIDECAR, "mesh", NO_SIDECAR, 80)[0]


def test_principals_deny_and_header_conditions():
    principal = _ap("sa", "mesh", [{"from": [{"source": {"principals": ["cluster.local/ns/mesh/sa/runner"]}}]}],
                    selector=DB)
    net = Network([principal], NAMESPACES)
    assert net.allowed("mesh", WEB, "mesh", DB, 80, src_service_account="runner")[0]
    assert not net.allowed("mesh", WEB, "mesh", DB, 80, src_service_account="other")[0]
    assert net.allowed("mesh", WEB, "mesh", WEB, 80)[0]  # the policy selects db pods only
    no_user = _ap("api", "mesh", [{"when": [{"key": "request.headers[kubeflow-userid]", "notValues": ["*"]}]}])
    net = Network([no_user], NAMESPACES)
    assert net.allowed("mesh", NO_SIDECAR, "mesh", DB, 8887)[0]  # any source, the header absent
    assert not net.allowed("mesh", NO_SIDECAR, "mesh", DB, 8887, request={"headers": {"kubeflow-userid": "u"}})[0]
    deny = _ap("no-8080", "mesh", [{"to": [{"operation": {"ports": ["8080"]}}]}], action="DENY")
    net = Network([deny, _ap("all", "mesh", [{}])], NAMESPACES)
    assert net.allowed("mesh", WEB, "mesh", DB, 80)[0] and not net.allowed("mesh", WEB, "mesh", DB, 8080)[0]


def test_strict_mtls_refuses_plaintext_and_permissive_accepts_it():
    for policies, plaintext_ok in (([], True), ([_pa("istio-system", "STRICT")], False),
                                   ([_pa("istio-system", "STRICT"), _pa("mesh", "PERMISSIVE")], True),
                                   ([_pa("mesh", "PERMISSIVE"), _pa("mesh", "STRICT", selector=DB)], False)):
        net = Network(policies, NAMESPACES)
        ok, why = net.allowed("a", WEB, "mesh", DB, 8887)
        assert ok is plaintext_ok, (policies, why)
        assert net.allowed("mesh", WEB, "mesh", DB, 8887)[0]  # a source with sidecar speaks mTLS


# --- the proxies --------------------------------------------------------------------------------------------


@pytest.fixture
def echo():
    """A TCP server on loopback that answers each connection with what it received."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(1024)
                conn.sendall(b"echo:" + data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()
    server.close()


def _talk(address: str, port: int) -> bytes:
    """What the server answers; b"" when the connection is closed on us (a refused one: closed, or reset when our
    bytes were still unread)."""
    with socket.create_connection((address, port), timeout=5) as conn:
        try:
            conn.sendall(b"hi")
            return conn.recv(1024)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def test_proxies_forward_allowed_and_close_denied_connections(echo):
    policy = _np("db", "a", {"matchLabels": DB}, ingress=[{"from": [{"podSelector": {"matchLabels": WEB}}]}])
    with Network([policy], NAMESPACES) as net:
        net.add_service("db.a.svc.cluster.local", 15432, "a", DB, echo)
        web = SimpleNamespace(name="web-0", namespace="a", labels=WEB)
        other = SimpleNamespace(name="other-0", namespace="b", labels=WEB)
        web_hosts, other_hosts = net.attach(web), net.attach(other)
        assert set(web_hosts) == {"db.a.svc.cluster.local", "db.a.svc", "db.a", "db"}
        assert set(other_hosts) == {"db.a.svc.cluster.local", "db.a.svc", "db.a"}
        assert web_hosts["db"] != other_hosts["db.a"] and web_hosts["db"].startswith("127.")
        assert _talk(web_hosts["db"], 15432) == b"echo:hi"
        assert net.denied == []
        assert _talk(other_hosts["db.a"], 15432) == b""  # closed at once
        (refused,) = net.denied
        assert refused.startswith("b/other-0 → db.a.svc.cluster.local:15432: ingress of a:")
