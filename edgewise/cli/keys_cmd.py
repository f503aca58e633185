"""``edgewise keys``: the fleet's root key and release keys, and the signed trusted-key set.

Files in the keys directory (``--keys-dir``, default ``edgewise-keys``)::

    root.key, root.pub                    Ed25519 root key: signs only the key set (keep offline)
    release-{id}.key, release-{id}.pub    release keys: sign manifests and commands
    keyring.json                          which release keys are in the set, revoked, set version
    releases/{model}.jsonl                what `model publish` published (for rollback and gc)

Private keys are written 0600 with O_EXCL and never printed. Publishing and collecting retained
messages, which ``keys``, ``model``, ``cmd`` and ``fleet`` share, is :mod:`edgewise.cli.retained`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from edgewise.cli.connect import (
    DEFAULT_BROKER,
    Broker,
    BrokerOpt,
    PasswordFileOpt,
    TlsCaOpt,
    UsernameOpt,
    broker_settings,
    fail,
)
from edgewise.cli.retained import collect_retained, publish_retained, write_file
from edgewise.files import create_durably
from edgewise.releases import KeySet, public_entry, sign
from edgewise.releases.errors import BadKey
from edgewise.releases.signing import (
    generate,
    key_id,
    load_private,
    private_pem,
    public_pem,
    raw_public,
)

keys_app = typer.Typer(
    help="Root and release keys, and the signed trusted-key set on `fleet/keys`.",
    no_args_is_help=True,
)
err = Console(stderr=True)
out = Console()
DAY = 86400.0

KeysDirOpt = Annotated[
    Path,
    typer.Option(
        "--keys-dir", "-k", help="Directory of the keys (see `edgewise keys init`).",
        envvar="EDGEWISE_KEYS_DIR",
    ),
]  # fmt: skip
FleetRootOpt = Annotated[str, typer.Option("--fleet-root", help="Topic root of fleet topics.")]


def write_private(path: Path, data: bytes) -> None:
    """Create a private key file readable by its owner only, whole and durably; never
    overwrite one."""
    create_durably(path, data, mode=0o600)


# ----------------------------------------------------------------------------- keyring
@dataclass
class Keyring:
    dir: Path
    version: int = 0
    release_keys: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, keys_dir: Path) -> Keyring:
        path = keys_dir / "keyring.json"
        if not path.is_file():
            fail(f"no keys in {keys_dir}: run `edgewise keys init --out-dir {keys_dir}` first")
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(keys_dir, data["version"], data["release_keys"], data["revoked"])

    def save(self) -> None:
        data = {"version": self.version, "release_keys": self.release_keys, "revoked": self.revoked}
        write_file(self.dir / "keyring.json", json.dumps(data, indent=2).encode())

    def _private(self, name: str) -> Ed25519PrivateKey:
        path = self.dir / f"{name}.key"
        try:
            return load_private(path.read_bytes())
        except OSError as exc:
            fail(f"cannot read {path}: {exc}")
        except BadKey as exc:
            fail(f"{path}: {exc}")

    def root(self) -> Ed25519PrivateKey:
        return self._private("root")

    def active_ids(self) -> list[str]:
        return [k for k in self.release_keys if k not in self.revoked]

    def release_key(self) -> Ed25519PrivateKey:
        """The newest release key not revoked."""
        active = self.active_ids()
        if not active:
            fail("every release key is revoked: run `edgewise keys rotate`")
        return self._private(f"release-{active[-1]}")

    def new_release_key(self) -> str:
        key = generate()
        kid = key_id(raw_public(key))
        write_private(self.dir / f"release-{kid}.key", private_pem(key))
        write_file(self.dir / f"release-{kid}.pub", public_pem(key))
        self.release_keys.append(kid)
        return kid

    def signed_set(self, expires_days: float) -> tuple[KeySet, bytes]:
        now = time.time()
        keys = [public_entry(self._private(f"release-{k}")) for k in self.active_ids()]
        key_set = KeySet(
            version=self.version + 1,
            issued_at=now,
            expires_at=now + expires_days * DAY,
            keys=keys,
            revoked=list(self.revoked),
        )
        return key_set, sign(key_set, self.root())


# ----------------------------------------------------------------------------- commands
@keys_app.command("init")
def init(
    out_dir: Annotated[
        Path, typer.Option("--out-dir", "-o", help="Where to write the keys (created).")
    ] = Path("edgewise-keys"),
) -> None:
    """Create a root key and a first release key (Ed25519; private files 0600, never printed).

    Enrol nodes with the root public key: `updates.root_key = "OUT_DIR/root.pub"`. Then publish
    the trusted-key set with `edgewise keys publish-set`.
    """
    if (out_dir / "root.key").exists() or (out_dir / "keyring.json").exists():
        fail(f"{out_dir} already holds keys; use another --out-dir or `edgewise keys rotate`")
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    root = generate()
    write_private(out_dir / "root.key", private_pem(root))
    write_file(out_dir / "root.pub", public_pem(root))
    ring = Keyring(out_dir)
    kid = ring.new_release_key()
    ring.save()
    out.print(f"root key    {key_id(raw_public(root))}  {out_dir / 'root.pub'} (+ root.key, 0600)")
    out.print(f"release key {kid}  {out_dir / f'release-{kid}.pub'} (+ .key, 0600)")
    out.print(
        f'next: enrol nodes with updates.root_key = "{(out_dir / "root.pub").resolve()}", then'
        f" `edgewise keys publish-set --keys-dir {out_dir}`"
    )


def _key_set_topic(fleet_root: str) -> str:
    from schemas import Topics

    return Topics(fleet_root=fleet_root).fleet_keys()


def _check_newer_than_retained(
    ring: Keyring, broker: Broker, topic: str, settle_s: float, force: bool
) -> None:
    """Refuse (unless ``force``) to publish a key set whose version is not above the one
    retained on the broker: nodes holding that one refuse it (``key_set_rollback``), and a keys
    directory behind the broker is most likely an old copy that lacks newer release keys."""
    from edgewise.releases import Rejected, decode_document, decode_envelope

    got = collect_retained(broker, [topic], settle_s)
    if topic not in got:
        return
    try:
        retained = decode_document(decode_envelope(got[topic]), KeySet).version
    except Rejected as exc:
        err.print(
            f"note: the retained message on {topic} is not a key set ({exc}); replacing it",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
        return
    mine = ring.version + 1
    if retained >= mine and not force:
        fail(
            f"{broker.url} already holds key set v{retained} on {topic}, and {ring.dir} would"
            f" publish v{mine}: nodes refuse a key set that is not newer than theirs. Is"
            f" {ring.dir} an old copy of the keys directory? (--force publishes it anyway)"
        )


def _publish_set(
    ring: Keyring, target: Target, expires_days: float, out_file: Path | None, fleet_root: str
) -> None:
    key_set, data = ring.signed_set(expires_days)
    topic = _key_set_topic(fleet_root)
    if out_file is not None:
        write_file(out_file, data)
        out.print(f"wrote key set v{key_set.version} to {out_file}")
        out.print(f"publish it: mosquitto_pub -r -q 1 -t {topic} -f {out_file}")
    else:
        broker = target.broker()
        publish_retained(broker, [(topic, data)])
        out.print(f"published key set v{key_set.version} retained on {topic} at {broker.url}")
    ring.version = key_set.version
    ring.save()
    out.print(f"trusted release keys: {', '.join(ring.active_ids())}")


@dataclass(frozen=True)
class Target:
    """A command's broker options, made into :class:`Broker` settings only when it connects
    (``--out`` writes files and needs none)."""

    url: str
    username: str | None
    password_file: Path | None
    tls_ca: Path | None

    def broker(self) -> Broker:
        return broker_settings(self.url, self.username, self.password_file, self.tls_ca)


ExpiresOpt = Annotated[
    float, typer.Option("--expires-days", min=0.01, help="The set expires after this many days.")
]
OutFileOpt = Annotated[
    Path | None, typer.Option("--out", help="Write the signed set to FILE instead of publishing.")
]
SettleOpt = Annotated[
    float,
    typer.Option(
        "--settle-s", min=0.1, help="How long to wait for retained messages when reading them."
    ),
]
ForceSetOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Publish even if the broker holds a key set of the same or a higher version.",
    ),
]


def _guarded(
    ring: Keyring, target: Target, out_file: Path | None, fleet_root: str, settle_s: float,
    force: bool,
) -> None:  # fmt: skip
    """The version check against the broker, before the keys directory changes."""
    if out_file is None:
        _check_newer_than_retained(
            ring, target.broker(), _key_set_topic(fleet_root), settle_s, force
        )


@keys_app.command("publish-set")
def publish_set(
    keys_dir: KeysDirOpt = Path("edgewise-keys"),
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    expires_days: ExpiresOpt = 90.0,
    out_file: OutFileOpt = None,
    fleet_root: FleetRootOpt = "fleet",
    settle_s: SettleOpt = 1.0,
    force: ForceSetOpt = False,
) -> None:
    """Sign the trusted release-key set with the root key (version + 1) and publish it retained
    on `fleet/keys`.

    Refuses when the broker already holds a key set of that version or a higher one (read
    from the retained `fleet/keys`), unless --force."""
    ring = Keyring.load(keys_dir)
    target = Target(broker, username, password_file, tls_ca)
    _guarded(ring, target, out_file, fleet_root, settle_s, force)
    _publish_set(ring, target, expires_days, out_file, fleet_root)


@keys_app.command("rotate")
def rotate(
    keys_dir: KeysDirOpt = Path("edgewise-keys"),
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    expires_days: ExpiresOpt = 90.0,
    out_file: OutFileOpt = None,
    fleet_root: FleetRootOpt = "fleet",
    revoke_old: Annotated[
        bool, typer.Option("--revoke-old", help="Also revoke every older release key.")
    ] = False,
    settle_s: SettleOpt = 1.0,
    force: ForceSetOpt = False,
) -> None:
    """Add a new release key (it signs from now on) and publish the new set (refused, with the
    keys directory unchanged, if the broker holds a newer set; see publish-set)."""
    ring = Keyring.load(keys_dir)
    target = Target(broker, username, password_file, tls_ca)
    _guarded(ring, target, out_file, fleet_root, settle_s, force)
    old = ring.active_ids()
    kid = ring.new_release_key()
    if revoke_old:
        ring.revoked.extend(old)
    ring.save()
    out.print(f"new release key {kid}")
    _publish_set(ring, target, expires_days, out_file, fleet_root)


@keys_app.command("revoke")
def revoke(
    key: Annotated[str, typer.Argument(help="The release key id to revoke.")],
    keys_dir: KeysDirOpt = Path("edgewise-keys"),
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    expires_days: ExpiresOpt = 90.0,
    out_file: OutFileOpt = None,
    fleet_root: FleetRootOpt = "fleet",
    settle_s: SettleOpt = 1.0,
    force: ForceSetOpt = False,
) -> None:
    """Revoke a release key: publish a new set without it (nodes refuse what it signs)."""
    ring = Keyring.load(keys_dir)
    if key not in ring.release_keys:
        fail(f"no release key {key} in {keys_dir}; known: {', '.join(ring.release_keys)}")
    target = Target(broker, username, password_file, tls_ca)
    _guarded(ring, target, out_file, fleet_root, settle_s, force)
    if key not in ring.revoked:
        ring.revoked.append(key)
    ring.save()
    _publish_set(ring, target, expires_days, out_file, fleet_root)
