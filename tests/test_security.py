"""TLS (server and mutual), bearer tokens and per-client limits, over real sockets."""

from __future__ import annotations

import datetime
import ipaddress
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distspec.cluster.ray_cluster import ClusterConfig
from distspec.edge_client import EdgeClient
from distspec.scheduler.runtime import Runtime, RuntimeConfig
from distspec.scheduler.scheduler import SchedulerConfig
from distspec.server.grpc_server import GrpcServer
from distspec.server.security import ClientLimits, TlsConfig, read_tokens
from distspec.spec_decode.drafters.factory import new_drafter
from distspec.spec_decode.sampling import SamplingParams
from distspec.workers.target import TargetSpec
from test_decoding import greedy_ar

TOKENS = {"good-token", "other-token"}


def _cert(name: str, key, issuer_name, issuer_key, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("distspec test CA", ca_key, None, None, ca=True)
    files = {"ca": root / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, ca.subject, ca_key, server=server)
        files[name] = root / f"{name}.pem"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}_key"] = root / f"{name}.key"
        files[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def runtime(tiny_dir):
    cluster = ClusterConfig(
        target=TargetSpec(str(tiny_dir), num_slots=4, max_len=288), drafter=None
    )
    rt = Runtime(RuntimeConfig(cluster, SchedulerConfig(mode="ar"), use_ray=False))
    yield rt
    rt.close()


def start(runtime, **kwargs) -> tuple[GrpcServer, str]:
    server = GrpcServer(runtime, port=0, host="127.0.0.1", **kwargs)
    return server, f"127.0.0.1:{server.start()}"


def edge(address, **kwargs) -> tuple[list[int], object]:
    client = EdgeClient(address, new_drafter(None), gamma=3, **kwargs)
    try:
        steps = list(client.generate(SamplingParams(max_new_tokens=12), prompt="abcabc"))
    finally:
        client.close()
    return [t for s in steps for t in s.token_ids], steps[-1]


def test_tls_and_tokens(runtime, target, pki):
    tls = TlsConfig(pki["server"], pki["server_key"])
    server, address = start(runtime, tls=tls, tokens=TOKENS)
    try:
        expected = greedy_ar(target, runtime.tokenizer.encode("abcabc"), 12)
        ids, _ = edge(address, tls_ca=pki["ca"], token="good-token")
        assert ids == expected
        for token in (None, "bad-token"):
            with pytest.raises(grpc.RpcError) as err:
                edge(address, tls_ca=pki["ca"], token=token)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:  # plaintext to a TLS port
            edge(address, token="good-token")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # health checking answers without a token (probes of orchestrators)
        creds = grpc.ssl_channel_credentials(Path(pki["ca"]).read_bytes())
        with grpc.secure_channel(address, creds) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace_s=1)
    assert runtime.scheduler.state().free_slots == 4


def test_mutual_tls(runtime, pki):
    tls = TlsConfig(pki["server"], pki["server_key"], client_ca=pki["ca"])
    server, address = start(runtime, tls=tls)
    try:
        ids, _ = edge(address, tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client_key"])
        assert len(ids) == 12
        with pytest.raises(grpc.RpcError) as err:  # no client certificate
            edge(address, tls_ca=pki["ca"])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace_s=1)


def test_per_client_session_and_rate_limits(runtime, tiny_dir):
    from distspec.v1 import speculative_decoding_pb2 as pb
    from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc

    limits = ClientLimits(max_sessions=1, requests_per_minute=3)
    server, address = start(runtime, tokens=TOKENS, limits=limits)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.SpeculativeDecodingStub(channel)

            def call(token, n=40):
                request = pb.GenerateRequest(prompt="abc", max_new_tokens=n)
                return stub.Generate(
                    request, timeout=30, metadata=[("authorization", f"Bearer {token}")]
                )

            holding = call("good-token", 250)
            next(holding)
            with pytest.raises(grpc.RpcError) as err:
                list(call("good-token"))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "session limit" in err.value.details()
            assert len([t for r in call("other-token", 5) for t in r.token_ids]) == 5
            holding.cancel()
            ledger = server.servicer.ledger
            deadline = time.monotonic() + 10
            while ledger.open_sessions("token:good-token"):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # 3 sessions a minute: the refused one did not count
            list(call("good-token", 3))
            list(call("good-token", 3))
            with pytest.raises(grpc.RpcError) as err:
                list(call("good-token", 3))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit" in err.value.details()
    finally:
        server.stop(grace_s=1)


def test_read_tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# clients\nalpha\n\nbeta  # the edge box\n")
    assert read_tokens(str(path)) == {"alpha", "beta"}
    path.write_text("# none\n")
    with pytest.raises(ValueError, match="no tokens"):
        read_tokens(str(path))
