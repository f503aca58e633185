"""Start a real Mosquitto from the shipped compose configs (compose/mosquitto/{site,cloud}), with
certificates made here (``cryptography``) and a password file made by ``mosquitto_passwd``.

Only what cannot be the same outside a container changes: paths under ``/mosquitto/`` move to a
temporary directory, the edgewise_clientid plugin is the one ``./dev.sh`` built from
compose/mosquitto/plugin (:func:`clientid_plugin`), the listeners 1883 (plain) and 8883 (TLS)
move to free loopback ports, and the broker also logs to a file (flushed per line, so a test can
read the log while the broker runs; its stdout is block-buffered).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgewise.local_broker import BrokerInfo, mosquitto_path
from edgewise.local_broker.info import free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE_MOSQUITTO = REPO / "compose" / "mosquitto"
PLUGIN_SOURCE = COMPOSE_MOSQUITTO / "plugin" / "edgewise_clientid.c"
#: Where the compose configs load the plugin from (the compose brokers' image has it there).
PLUGIN_IN_IMAGE = "/mosquitto/plugins/edgewise_clientid.so"


def clientid_plugin() -> Path:
    """The edgewise_clientid plugin ``./dev.sh`` built from :data:`PLUGIN_SOURCE`.

    ``compose/mosquitto/plugin/build.sh`` builds it into ``$EDGEWISE_MOSQUITTO_PLUGIN_DIR``, by
    default ``<virtualenv>/lib/edgewise-mosquitto/``, next to a ``.sha256`` of the source it was
    built from: a missing or stale build is an error naming the command that makes it.
    """
    default = Path(sys.prefix) / "lib" / "edgewise-mosquitto"
    built = Path(os.environ.get("EDGEWISE_MOSQUITTO_PLUGIN_DIR") or default)
    so = built / "edgewise_clientid.so"
    stamp = built / "edgewise_clientid.so.sha256"
    want = hashlib.sha256(PLUGIN_SOURCE.read_bytes()).hexdigest()
    have = stamp.read_text().strip() if stamp.exists() else ""
    if not so.exists() or have != want:
        state = "is not built" if not so.exists() else "was built from an older source"
        raise RuntimeError(
            f"the edgewise_clientid Mosquitto plugin {state} ({so}): run ./dev.sh test once, or "
            f"compose/mosquitto/plugin/build.sh {built}"
        )
    return so


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(dir: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = dir / f"{cn}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_pki(dir: Path, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Pki:
    """A CA and a server certificate it signed, valid for ``hosts`` (names and IPs)."""
    dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert, ca_path = make_ca(dir, "edgewise-test-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_cert = dir / "server.crt"
    server_key = dir / "server.key"
    server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(server_key, 0o600)
    return Pki(ca_path, server_cert, server_key)


def mounted_secrets(role: str) -> list[tuple[str, str]]:
    """What compose/docker-compose.yml mounts from make-secrets.sh's directory into a Mosquitto
    broker: (file in that directory, path under /mosquitto/)."""
    return [
        (f"{role}.passwd", f"secrets/{role}.passwd"),
        ("certs/ca.crt", "certs/ca.crt"),
        ("certs/server.crt", "certs/server.crt"),
        ("mosquitto-server.key", "certs/server.key"),
    ]


def _copy_as_mounted(src: Path, dst: Path) -> None:
    """``src`` at ``dst`` with its bytes, mode and owner: what a bind mount of it shows."""
    shutil.copy2(src, dst)
    st = src.stat()
    os.chown(dst, st.st_uid, st.st_gid)


def write_passwords(path: Path, passwords: dict[str, str]) -> None:
    """A mosquitto password file (hashed by mosquitto_passwd itself)."""
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    path.write_text("")
    for user, password in passwords.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    os.chmod(path, 0o600)


class SecureBroker:
    """A mosquitto from ``compose/mosquitto/{role}/mosquitto.conf`` on ``plain``/``tls`` ports.

    By default with ``passwords`` hashed here and the certificates of ``pki``. With ``secrets``
    (a directory made by compose/make-secrets.sh) it takes the very files compose mounts
    instead, each copied with its owner and mode (as a bind mount shows them), and with
    ``run_as_uid`` it runs as that user (``setpriv``; needs root), as in the container.
    """

    def __init__(
        self,
        role: str,
        root: Path,
        passwords: dict[str, str] | None = None,
        pki: Pki | None = None,
        *,
        secrets: Path | None = None,
        run_as_uid: int | None = None,
    ) -> None:
        self.role, self.root, self.pki = role, root, pki
        self.passwords = passwords or {}
        self.run_as_uid = run_as_uid
        self.plain_port = free_port()
        self.tls_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("config", "secrets", "certs", "data"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.copytree(
            COMPOSE_MOSQUITTO / "conf.d", root / "config" / "conf.d", dirs_exist_ok=True
        )
        shutil.copyfile(COMPOSE_MOSQUITTO / role / "acl", root / "config" / "acl")
        if secrets is None:
            assert pki is not None and passwords is not None
            for src, name in (
                (pki.ca_cert, "ca.crt"),
                (pki.server_cert, "server.crt"),
                (pki.server_key, "server.key"),
            ):
                shutil.copyfile(src, root / "certs" / name)
            write_passwords(root / "secrets" / f"{role}.passwd", passwords)
        else:  # what docker-compose.yml mounts into the broker's container
            for made, mounted in mounted_secrets(role):
                _copy_as_mounted(secrets / made, root / mounted)
        text = (COMPOSE_MOSQUITTO / role / "mosquitto.conf").read_text()
        assert text.count(f"plugin {PLUGIN_IN_IMAGE}\n") == 1, "the compose config loads the plugin"
        plugin = clientid_plugin()
        if run_as_uid is not None:  # another user must read it, wherever the checkout lies
            shutil.copyfile(plugin, root / plugin.name)
            os.chmod(root / plugin.name, 0o755)
            plugin = root / plugin.name
        text = text.replace(PLUGIN_IN_IMAGE, str(plugin))
        text = text.replace("/mosquitto/", f"{root}/")
        text, n1 = re.subn(
            r"^listener 1883$", f"listener {self.plain_port} 127.0.0.1", text, flags=re.M
        )
        text, n2 = re.subn(
            r"^listener 8883$", f"listener {self.tls_port} 127.0.0.1", text, flags=re.M
        )
        assert n1 == n2 == 1, "the compose config must have listeners 1883 and 8883"
        self.log = root / "mosquitto.log"  # stdout and stderr (block-buffered)
        self.log_file = root / "data" / "broker.log"  # the same lines, flushed one by one
        text += f"\nlog_dest file {self.log_file}\n"
        if run_as_uid is not None:
            os.chown(root / "data", run_as_uid, run_as_uid)  # its data volume
        elif os.geteuid() == 0:
            text += "user root\n"
        self.config = root / "mosquitto.conf"
        self.config.write_text(text)

    @property
    def plain(self) -> BrokerInfo:
        return BrokerInfo(host="127.0.0.1", port=self.plain_port, kind="mosquitto")

    @property
    def tls(self) -> BrokerInfo:
        return BrokerInfo(host="127.0.0.1", port=self.tls_port, kind="mosquitto")

    def start(self, timeout_s: float = 10.0) -> None:
        binary = mosquitto_path()
        assert binary is not None, "mosquitto not installed"
        command = [binary, "-c", str(self.config)]
        if self.run_as_uid is not None:
            uid = self.run_as_uid
            command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        deadline = time.monotonic() + timeout_s
        import socket

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            ok = 0
            for port in (self.plain_port, self.tls_port):
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), 0.2),
                ):
                    ok += 1
            if ok == 2:
                return
            time.sleep(0.05)  # polling a port that is not open yet: there is no event to wait on
        raise RuntimeError(f"mosquitto did not listen in time: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        """What the broker has logged so far (its log file: complete up to the last line)."""
        if not self.log_file.exists():
            return ""
        return self.log_file.read_text(errors="replace")
