"""TLS, mutual TLS and bearer tokens against a real `gradguard serve`
(`--tls-cert/--tls-key`, `--tls-client-ca`, `--auth`), with certificates made
here by the openssl CLI: a P-256 CA, a server certificate for localhost and
127.0.0.1, a client certificate, and an unrelated second CA."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from conftest import gradguard_bin
from problems import Regression

import gradguard
from gradguard.v1 import gradguard_pb2 as pb
from gradguard.v1 import gradguard_pb2_grpc

STEPS = 20
CLIENT_NAME = "trainer.example.internal"


def openssl(command: str, cwd: Path) -> None:
    subprocess.run(["openssl", *command.split()], cwd=cwd, check=True, capture_output=True)


KEY = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"


def make_ca(d: Path, name: str) -> None:
    openssl(
        f"req -x509 -new {KEY} -keyout {name}.key -out {name}.pem -days 1 -subj /CN=gradguard-test-{name} "
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
        d,
    )


def make_leaf(d: Path, name: str, ca: str, usage: str, san: str) -> None:
    """A certificate for `name` signed by `ca`, with extended key usage
    `usage` and subject alternative names `san`."""
    (d / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\n"
        f"subjectAltName={san}\n"
    )
    openssl(f"req -new {KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}", d)
    openssl(
        f"x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -set_serial {secrets.randbits(63)} -days 1 "
        f"-extfile {name}.ext -out {name}.pem",
        d,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("these tests make their certificates with the openssl CLI")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_leaf(d, "server", "ca", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    make_leaf(d, "client", "ca", "clientAuth", f"DNS:{CLIENT_NAME}")
    return d


def tls_args(certs: Path, client_ca: bool = False) -> tuple[str, ...]:
    args = ("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"))
    return args + (("--tls-client-ca", str(certs / "ca.pem")) if client_ca else ())


def auth_file(d: Path, principals: list[dict]) -> str:
    """An `--auth` file; a principal's `token` is written as its sha256."""
    lines = []
    for p in principals:
        lines += ["[[principal]]", f'name = "{p["name"]}"']
        if "token" in p:
            lines.append(f'token_sha256 = "{hashlib.sha256(p["token"].encode()).hexdigest()}"')
        if "client_cert_name" in p:
            lines.append(f'client_cert_name = "{p["client_cert_name"]}"')
        lines.append("scopes = [" + ", ".join(f'"{s}"' for s in p["scopes"]) + "]")
    path = d / "auth.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def query_job(server, job: str, certs: Path | None = None, token: str | None = None, client_cert: bool = False):
    """The job as the service stored it, once it holds `STEPS` steps (polled)."""
    if certs is None:
        channel = grpc.insecure_channel(server.addr)
    else:
        creds = grpc.ssl_channel_credentials(
            (certs / "ca.pem").read_bytes(),
            (certs / "client.key").read_bytes() if client_cert else None,
            (certs / "client.pem").read_bytes() if client_cert else None,
        )
        channel = grpc.secure_channel(server.addr, creds)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    stub = gradguard_pb2_grpc.QueryStub(channel)
    deadline = time.monotonic() + 20
    last = None
    with channel:
        while time.monotonic() < deadline:
            try:
                last = stub.GetJob(pb.GetJobRequest(job=job), metadata=metadata, timeout=5)
                if last.HasField("last_step") and last.last_step >= STEPS:
                    return last
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            time.sleep(0.05)
    raise AssertionError(f"job {job} never reached step {STEPS}: {last}")


def train(job: str, **options) -> gradguard.Guard:
    """A few guarded steps of a tiny model; the guard, closed (all sent)."""
    run = Regression(peak_lr=0.05)
    with gradguard.watch(run.model, run.optimizer, job=job, **options) as guard:
        run.train_guarded(guard, steps=STEPS)
    return guard


def until(guard: gradguard.Guard, condition, timeout: float = 15.0):
    """Polls `condition(guard.stats)` until true; the stats then."""
    deadline = time.monotonic() + timeout
    while not condition(stats := guard.stats):
        assert time.monotonic() < deadline, f"condition never held: {stats}"
        time.sleep(0.02)
    return stats


def refused_run(job: str, condition, **options):
    """A run against a server that will not have it: the loop goes on, and
    the stats once `condition` holds."""
    run = Regression(peak_lr=0.05)
    guard = gradguard.watch(run.model, run.optimizer, job=job, **options)
    try:
        run.train_guarded(guard, steps=STEPS)
        return until(guard, condition)
    finally:
        guard.close(flush_timeout=0)


# ----------------------------------------------------------------- TLS


def test_tls_handshake_and_the_job_is_stored(make_server, certs):
    server = make_server(extra=tls_args(certs))
    guard = train("tls-job", server=f"https://localhost:{server.grpc_port}", tls_ca=certs / "ca.pem", linger=0)
    assert guard.stats.connects >= 1 and guard.stats.sent == STEPS, guard.stats
    assert guard.stats.last_error == ""
    assert query_job(server, "tls-job", certs).layers == 3


def test_tls_from_the_environment_and_an_ip_address(make_server, certs, monkeypatch):
    server = make_server(extra=tls_args(certs))
    monkeypatch.setenv("GRADGUARD_SERVER", server.addr)  # 127.0.0.1:port: a CA makes it TLS
    monkeypatch.setenv("GRADGUARD_TLS_CA", str(certs / "ca.pem"))
    guard = train("tls-env")
    assert guard.stats.sent == STEPS and guard.stats.last_error == "", guard.stats
    assert query_job(server, "tls-env", certs).last_step == STEPS


def test_a_server_signed_by_another_ca_is_refused_client_side(make_server, certs):
    server = make_server(extra=tls_args(certs))
    stats = refused_run(
        "wrong-ca",
        lambda s: s.last_error,
        server=f"https://localhost:{server.grpc_port}",
        tls_ca=certs / "other-ca.pem",
    )
    assert not stats.connected and stats.connects == 0
    assert "verify_failed" in stats.last_error.lower(), stats.last_error
    assert not stats.refused, "a handshake failure is retried: the server may come back with other certificates"


def test_plaintext_to_a_tls_server_does_not_connect(make_server, certs):
    server = make_server(extra=tls_args(certs))
    stats = refused_run("plain-to-tls", lambda s: s.last_error, server=server.addr)
    assert not stats.connected and stats.connects == 0, stats
    assert "use https://" in stats.last_error, stats.last_error


# --------------------------------------------------------- mutual TLS


def test_mutual_tls_with_a_client_certificate(make_server, certs):
    server = make_server(extra=tls_args(certs, client_ca=True))
    guard = train(
        "mtls-job",
        server=f"https://localhost:{server.grpc_port}",
        tls_ca=certs / "ca.pem",
        tls_cert=certs / "client.pem",
        tls_key=certs / "client.key",
    )
    assert guard.stats.sent == STEPS and guard.stats.last_error == "", guard.stats
    assert query_job(server, "mtls-job", certs, client_cert=True).layers == 3


def test_mutual_tls_without_a_client_certificate_is_refused(make_server, certs):
    server = make_server(extra=tls_args(certs, client_ca=True))
    stats = refused_run(
        "mtls-anon", lambda s: s.last_error, server=f"https://localhost:{server.grpc_port}", tls_ca=certs / "ca.pem"
    )
    assert not stats.connected and stats.connects == 0, stats
    assert "client certificate" in stats.last_error, stats.last_error


def test_mutual_tls_identity_is_a_principal(make_server, certs, tmp_path, monkeypatch):
    auth = auth_file(tmp_path, [{"name": "trainers", "client_cert_name": CLIENT_NAME, "scopes": ["ingest:team-a/*"]}])
    server = make_server(extra=(*tls_args(certs, client_ca=True), "--auth", auth))
    monkeypatch.setenv("GRADGUARD_TLS_CA", str(certs / "ca.pem"))
    monkeypatch.setenv("GRADGUARD_TLS_CLIENT_CERT", str(certs / "client.pem"))
    monkeypatch.setenv("GRADGUARD_TLS_CLIENT_KEY", str(certs / "client.key"))
    guard = train("team-a/by-cert", server=f"https://localhost:{server.grpc_port}")
    assert guard.stats.sent == STEPS and guard.stats.last_error == "", guard.stats
    stats = refused_run("team-b/by-cert", lambda s: s.refused, server=f"https://localhost:{server.grpc_port}", linger=0)
    assert stats.last_error.startswith("PERMISSION_DENIED") and "team-b/by-cert" in stats.last_error, stats


# -------------------------------------------------------------- tokens


@pytest.fixture
def auth_server(make_server, certs, tmp_path):
    """A TLS server with `--auth`: team-a's token and team-b's token."""
    tokens = {"team-a": secrets.token_urlsafe(24), "team-b": secrets.token_urlsafe(24)}
    auth = auth_file(
        tmp_path,
        [
            {"name": "team-a-trainers", "token": tokens["team-a"], "scopes": ["ingest:team-a/*", "query:team-a/*"]},
            {"name": "team-b-trainers", "token": tokens["team-b"], "scopes": ["ingest:team-b/*"]},
        ],
    )
    server = make_server(extra=(*tls_args(certs), "--auth", auth))
    server.url = f"https://localhost:{server.grpc_port}"
    server.tokens = tokens
    return server


def test_the_right_token_streams_and_never_shows(auth_server, certs, caplog):
    token = auth_server.tokens["team-a"]
    caplog.set_level(logging.DEBUG, logger="gradguard")
    run = Regression(peak_lr=0.05)
    options = {"server": auth_server.url, "tls_ca": certs / "ca.pem", "token": token}
    with gradguard.watch(run.model, run.optimizer, job="team-a/x", **options) as guard:
        run.train_guarded(guard, steps=STEPS)
        shown = [
            repr(guard),
            repr(guard._conn),
            repr(guard._conn.endpoint),
            str(guard._conn.endpoint),
            str(guard.stats),
        ]
    assert guard.stats.sent == STEPS and guard.stats.last_error == "", guard.stats
    assert query_job(auth_server, "team-a/x", certs, token=token).last_step == STEPS
    assert not any(token in s for s in [*shown, caplog.text])


def test_the_token_from_the_environment(auth_server, certs, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADGUARD_TLS_CA", str(certs / "ca.pem"))
    monkeypatch.setenv("GRADGUARD_TOKEN", auth_server.tokens["team-a"])
    guard = train("team-a/env", server=auth_server.url)
    assert guard.stats.sent == STEPS and guard.stats.last_error == "", guard.stats

    monkeypatch.delenv("GRADGUARD_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text(auth_server.tokens["team-a"] + "\n")
    monkeypatch.setenv("GRADGUARD_TOKEN_FILE", str(token_file))
    guard = train("team-a/file", server=auth_server.url)
    assert guard.stats.sent == STEPS and guard.stats.last_error == "", guard.stats
    assert query_job(auth_server, "team-a/file", certs, token=auth_server.tokens["team-a"]).last_step == STEPS
    # The CLI reads the same variables.
    command = [gradguard_bin(), "jobs", "--json", "--server", auth_server.url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert {json.loads(line)["job"] for line in out.stdout.splitlines()} >= {"team-a/env", "team-a/file"}, out.stdout


@pytest.mark.parametrize("token", [None, "not-a-known-token"])
def test_no_token_or_a_wrong_one_is_unauthenticated_and_not_retried(auth_server, certs, token, caplog):
    caplog.set_level(logging.INFO, logger="gradguard")
    stats = refused_run(
        "team-a/anon", lambda s: s.refused, server=auth_server.url, tls_ca=certs / "ca.pem", token=token, linger=0
    )
    assert stats.last_error.startswith("UNAUTHENTICATED: "), stats
    assert not stats.connected and stats.connects == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "UNAUTHENTICATED" in errors[0].getMessage(), caplog.text
    if token:
        assert token not in caplog.text and token not in stats.last_error


def test_a_token_outside_its_scope_is_permission_denied_naming_the_job(auth_server, certs):
    stats = refused_run(
        "team-a/x",
        lambda s: s.refused,
        server=auth_server.url,
        tls_ca=certs / "ca.pem",
        token=auth_server.tokens["team-b"],
        linger=0,
    )
    assert stats.last_error.startswith("PERMISSION_DENIED: "), stats
    assert "team-a/x" in stats.last_error, stats.last_error
    assert not stats.connected and stats.connects == 0


def test_a_token_over_plaintext_works_with_one_warning(make_server, tmp_path, caplog):
    token = secrets.token_urlsafe(24)
    server = make_server(extra=("--auth", auth_file(tmp_path, [{"name": "a", "token": token, "scopes": ["admin"]}])))
    caplog.set_level(logging.INFO, logger="gradguard")
    guard = train("plain-token", server=server.addr, token=token)
    assert guard.stats.sent == STEPS and guard.stats.last_error == "", guard.stats
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "plaintext" in warnings[0], warnings
    assert token not in caplog.text


# ------------------------------------------------------------- options


def test_bad_options_raise_at_watch_naming_the_option_and_path(certs, tmp_path, monkeypatch):
    run = Regression(peak_lr=0.05)

    def watch(**options):
        return gradguard.watch(run.model, run.optimizer, job="never", **options)

    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=r"tls_cert given without tls_key"):
        watch(server="https://localhost:1", tls_cert=certs / "client.pem")
    with pytest.raises(ValueError, match=f"tls_ca: cannot read {re.escape(str(missing))}"):
        watch(server="https://localhost:1", tls_ca=missing)
    with pytest.raises(ValueError, match=f"tls_key: cannot read {re.escape(str(missing))}"):
        watch(tls_cert=certs / "client.pem", tls_key=missing)
    with pytest.raises(ValueError, match=r"tls_ca: .*server.ext is not PEM"):
        watch(tls_ca=certs / "server.ext")
    with pytest.raises(ValueError, match=r"tls_ca given, but server 'http://localhost:1' is plaintext"):
        watch(server="http://localhost:1", tls_ca=certs / "ca.pem")
    with pytest.raises(ValueError, match=r"token: the bearer token is empty"):
        watch(token="")
    with pytest.raises(ValueError, match=r"kafka_properties"):
        watch(kafka_brokers="localhost:1", token="t")
    monkeypatch.setenv("GRADGUARD_TOKEN_FILE", str(missing))
    with pytest.raises(ValueError, match=f"GRADGUARD_TOKEN_FILE: cannot read {re.escape(str(missing))}"):
        watch(server="localhost:1")
    monkeypatch.setenv("GRADGUARD_TOKEN", "secret-part\tother-part")
    with pytest.raises(ValueError, match=r"GRADGUARD_TOKEN: the bearer token has characters") as e:
        watch(server="localhost:1")
    assert "secret-part" not in str(e.value), "the message never quotes the token"
