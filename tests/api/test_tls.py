"""TLS on the gRPC port: server certificates, mutual TLS, and a SIGHUP reload that drops no stream.

Certificates are made by the `openssl` command for each test: a CA, a
server certificate for 127.0.0.1 and a client certificate.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from conftest import ServerFactory, eventually, fake_model, next_message, poll
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc
from lemonade_grpc.client import connect
from lemonade_grpc.testing import serve_command


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    """A CA (`name`.pem, `name`.key), and the server and client certificates it signs (`name`-server...)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *key, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
            "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for role in ("server", "client"):
        openssl("req", *key, "-keyout", f"{name}-{role}.key", "-out", f"{name}-{role}.csr",
                "-subj", "/CN=127.0.0.1", cwd=directory)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}-{role}.csr", "-CA", f"{name}.pem", "-CAkey", f"{name}.key",
                "-CAcreateserial", "-out", f"{name}-{role}.pem", "-days", "1", "-extfile", "san.ext",
                cwd=directory)  # fmt: skip


def tls_config(directory: Path, name: str, tiny_model: Path, *, client_ca: bool = False) -> str:
    (directory / "server.pem").write_bytes((directory / f"{name}-server.pem").read_bytes())
    (directory / "server.key").write_bytes((directory / f"{name}-server.key").read_bytes())
    ca = f'client_ca_file = "{directory / f"{name}.pem"}"\n' if client_ca else ""
    return (
        f'[tls]\ncert_file = "{directory / "server.pem"}"\nkey_file = "{directory / "server.key"}"\n{ca}'
        + fake_model("m", tiny_model)
    )


def credentials(directory: Path, ca: str, client: str | None = None) -> grpc.ChannelCredentials:
    key = (directory / f"{client}-client.key").read_bytes() if client else None
    chain = (directory / f"{client}-client.pem").read_bytes() if client else None
    return grpc.ssl_channel_credentials((directory / f"{ca}.pem").read_bytes(), key, chain)


async def status_over(address: str, creds: grpc.ChannelCredentials | None) -> str:
    """ "OK", or the code of the failure, of a Status call over TLS (`creds`) or plaintext (None)."""
    channel = grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
    async with channel:
        try:
            await model_control_pb2_grpc.ModelControlStub(channel).Status(pb.StatusRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code().name
    return "OK"


async def test_tls_and_mutual_tls(servers: ServerFactory, tiny_model: Path, tmp_path: Path) -> None:
    make_ca(tmp_path, "one")
    plain_tls = servers.start(tls_config(tmp_path, "one", tiny_model))
    assert await status_over(plain_tls.address, credentials(tmp_path, "one")) == "OK"
    assert await status_over(plain_tls.address, None) == "UNAVAILABLE"  # plaintext to a TLS port

    mutual_dir = tmp_path / "mutual"
    make_ca(mutual_dir, "one")
    mutual = servers.start(tls_config(mutual_dir, "one", tiny_model, client_ca=True))
    assert await status_over(mutual.address, credentials(mutual_dir, "one", client="one")) == "OK"
    assert (
        await status_over(mutual.address, credentials(mutual_dir, "one")) == "UNAVAILABLE"
    )  # no client cert


async def test_sighup_reloads_the_certificate_and_keeps_streams(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    make_ca(tmp_path, "old")
    make_ca(tmp_path, "new")
    server = servers.start(tls_config(tmp_path, "old", tiny_model))
    async with grpc.aio.secure_channel(server.address, credentials(tmp_path, "old")) as old_channel:
        watch = model_control_pb2_grpc.ModelControlStub(old_channel).Watch(pb.WatchRequest())
        assert (await next_message(watch)).WhichOneof("event") == "snapshot"
        # New certificate files, then SIGHUP: new handshakes get the new certificate.
        (tmp_path / "server.pem").write_bytes((tmp_path / "new-server.pem").read_bytes())
        (tmp_path / "server.key").write_bytes((tmp_path / "new-server.key").read_bytes())
        server.process.send_signal(signal.SIGHUP)

        async def trusted_by_the_new_ca() -> bool | None:
            return True if await status_over(server.address, credentials(tmp_path, "new")) == "OK" else None

        await poll(trusted_by_the_new_ca, 15, "a handshake with the new certificate")
        assert await status_over(server.address, credentials(tmp_path, "old")) == "UNAVAILABLE"
        # The stream opened before the reload still delivers.
        async with grpc.aio.secure_channel(server.address, credentials(tmp_path, "new")) as new_channel:
            loaded = [
                r
                async for r in model_control_pb2_grpc.ModelControlStub(new_channel).Load(
                    pb.LoadRequest(model="m")
                )
            ]
        assert loaded[-1].phase == pb.LOAD_PHASE_READY
        event = await asyncio.wait_for(next_message(watch), 15)
        watch.cancel()
    assert event.WhichOneof("event") in ("load_progress", "model_state_changed", "model_loaded")
    assert "certificate reloaded" in server.log()


@pytest.mark.parametrize("missing", ["cert_file", "key_file"])
def test_tls_needs_both_files(tmp_path: Path, missing: str) -> None:
    from lemonade_grpc.config import ConfigError, Overrides, load

    (tmp_path / "x.pem").write_text("x")
    keys = {"cert_file": "x.pem", "key_file": "x.pem"}
    del keys[missing]
    config = tmp_path / "c.toml"
    config.write_text("[tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in keys.items()))
    with pytest.raises(ConfigError) as refused:
        load(Overrides(config=config), env={})
    assert refused.value.field == f"tls.{missing}"


async def test_the_client_and_the_cli_speak_tls(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    make_ca(tmp_path, "one")
    server = servers.start(tls_config(tmp_path, "one", tiny_model))
    async with connect(server.address, credentials=credentials(tmp_path, "one")) as client:
        assert [m.name for m in await client.models()] == ["m"]
    env = {**os.environ, "LEMONADE_GRPC_CA_FILE": str(tmp_path / "one.pem")}
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "lemonade_grpc", "status", "--address", server.address],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert (shown.returncode, shown.stdout.strip()) == (0, "no models loaded"), shown.stderr


def unusable(directory: Path, kind: str) -> tuple[bytes, bytes]:
    """Certificate and key file contents that gRPC cannot use: `kind` says how."""
    if kind == "garbage":
        return b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n", b"junk"
    if kind == "empty":
        return b"", b""
    # mismatched: the new CA's certificate with the old CA's key
    return (directory / "new-server.pem").read_bytes(), (directory / "old-server.key").read_bytes()


@pytest.mark.parametrize("kind", ["garbage", "empty", "mismatched"])
async def test_finding_8_a_reload_of_unusable_files_keeps_the_certificate_and_says_why(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path, kind: str
) -> None:
    # Issue 18 finding 8: the log said "certificate reloaded"; gRPC core then refused the files in a raw
    # line of its own (`Handshaker factory creation failed with TSI_INVALID_ARGUMENT`).
    make_ca(tmp_path, "old")
    make_ca(tmp_path, "new")
    server = servers.start(tls_config(tmp_path, "old", tiny_model))
    cert, key = unusable(tmp_path, kind)
    (tmp_path / "server.pem").write_bytes(cert)
    (tmp_path / "server.key").write_bytes(key)
    server.process.send_signal(signal.SIGHUP)
    await eventually(lambda: "TLS:" in server.log(), 15, "the reload's verdict in the log")
    log = server.log()
    assert "keeping the certificate in use" in log
    assert "certificate reloaded" not in log
    # Handshakes go on with the old certificate, and gRPC core never saw the bad files.
    assert await status_over(server.address, credentials(tmp_path, "old")) == "OK"
    assert await status_over(server.address, credentials(tmp_path, "new")) == "UNAVAILABLE"
    assert "Handshaker factory creation failed" not in server.log()
    assert server.process.poll() is None


def test_finding_8_unusable_files_at_start_are_a_listen_error(tmp_path: Path, tiny_model: Path) -> None:
    make_ca(tmp_path, "old")
    make_ca(tmp_path, "new")
    config = tmp_path / "c.toml"
    config.write_text(tls_config(tmp_path, "old", tiny_model))
    (tmp_path / "server.pem").write_bytes((tmp_path / "new-server.pem").read_bytes())
    command = [*serve_command(tmp_path / "state"), "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "the TLS files cannot be used: the key does not belong to the certificate" in result.stderr
