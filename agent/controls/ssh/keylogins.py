"""Proof that a sudo admin's SSH key logs in: what lets the SSH guard turn password logins off.

A key in authorized_keys proves nothing by itself: a typo, a key for another machine, a client that
never offers it, and turning passwords off would lock the admin out. So `PasswordAuthentication no`
waits for a publickey login of a sudo admin that sshd itself logged (agent/system/journal.py reads
only fields a local user cannot forge), with the key that logged in still in the admin's
authorized_keys, or for `vps-agentctl confirm`. The proof is kept in /var/lib/vps-agent/key-logins.json,
so a restart or a reboot does not ask for it again. It counts only while the key that logged in is
still in authorized_keys (a proof by `confirm`: while the admin has any key), checked whenever passwords
are to go off; a proof found stale is dropped, and the next key must prove itself again.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from agent.paths import SystemRoot
from agent.system import fs
from agent.system.journal import SshdLogin

CONFIRMED = "vps-agentctl confirm"


@dataclass(frozen=True)
class KeyProof:
    user: str
    how: str  # "publickey login from 10.213.0.2 port 40000" or CONFIRMED
    at: float  # wall clock
    fingerprint: str = ""  # "SHA256:..." of the key that logged in; "" for a proof by `confirm`
    # what the strict profile's sshd settings need to know of the admin's client (agent/controls/ssh/strict.py):
    keys_offered: int = 0  # keys its client offered, the one accepted included; 0: not known
    algorithms: tuple[tuple[str, str], ...] = ()  # (("cipher", ...), ("kex", ...), ("mac", ...)); (): not known

    def holds(self, fingerprints: Iterable[str]) -> bool:
        """Whether the proof still stands with these keys in the admin's authorized_keys."""
        keys = set(fingerprints)
        return self.fingerprint in keys if self.fingerprint else bool(keys)


def proofs_from(logins: Iterable[SshdLogin], awaiting: Iterable[str]) -> list[KeyProof]:
    """The newest publickey login of each awaited admin, as a proof of its key (sshd logs the key as
    "ED25519 SHA256:..."; a login without it proves nothing)."""
    wanted = set(awaiting)
    newest: dict[str, SshdLogin] = {}
    for login in logins:
        fingerprint = login.key.split()[-1] if login.key else ""
        if login.method == "publickey" and login.user in wanted and fingerprint.startswith("SHA256:"):
            newest[login.user] = login
    return [
        KeyProof(
            user,
            f"a publickey login from {login.address} port {login.port} ({login.key})",
            login.at,
            login.key.split()[-1],
            login.keys_offered,
            login.algorithms,
        )
        for user, login in sorted(newest.items())
    ]


class KeyLogins:
    """The proven key logins, shared by the SSH guard (which reads them) and the daemon (which records
    them from sshd's journal and from `confirm`)."""

    def __init__(self, root: SystemRoot) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._awaiting: frozenset[str] = frozenset()
        self._with_keys: frozenset[str] = frozenset()
        self.awaiting_changed = threading.Event()  # the login watcher wakes when the guard starts waiting
        self._forgotten: list[KeyProof] = []
        self.proofs, self.problem = self._load()

    def proof(self, user: str) -> KeyProof | None:
        with self._lock:
            return self.proofs.get(user)

    def record(self, proof: KeyProof) -> bool:
        """Keep a proof; False when that user already had one that stands for the same key and this one
        tells nothing new of the admin's client (what the client offered, what it negotiated)."""
        with self._lock:
            known = self.proofs.get(proof.user)
            if known is not None and known.fingerprint == proof.fingerprint:
                offered = proof.keys_offered or known.keys_offered
                algorithms = proof.algorithms or known.algorithms
                if (offered, algorithms) == (known.keys_offered, known.algorithms):
                    return False
                proof = replace(proof, keys_offered=offered, algorithms=algorithms)
            self.proofs[proof.user] = proof
            self._save()
            return True

    def forget(self, user: str) -> None:
        """The key that proved it is gone: the next key must prove itself again."""
        with self._lock:
            proof = self.proofs.pop(user, None)
            if proof is None:
                return
            self._forgotten.append(proof)
            self._save()
        self.awaiting_changed.set()  # the daemon reports it

    def take_forgotten(self) -> list[KeyProof]:
        with self._lock:
            forgotten, self._forgotten = self._forgotten, []
        return forgotten

    def take_problem(self) -> str | None:
        with self._lock:
            problem, self.problem = self.problem, None
        return problem

    # what the SSH guard waits for ---------------------------------------------------------------------

    @property
    def awaiting(self) -> frozenset[str]:
        """The sudo admins whose key login would let passwords go off (empty: nothing waits for one)."""
        with self._lock:
            return self._awaiting

    @property
    def awaiting_with_keys(self) -> frozenset[str]:
        """Those of them who have a key sshd accepts (what `vps-agentctl confirm` vouches for)."""
        with self._lock:
            return self._with_keys

    def set_awaiting(self, with_keys: Iterable[str], without_keys: Iterable[str] = ()) -> None:
        keyed = frozenset(with_keys)
        wanted = keyed | frozenset(without_keys)
        with self._lock:
            changed = wanted != self._awaiting
            self._awaiting, self._with_keys = wanted, keyed
        if changed and wanted:
            self.awaiting_changed.set()

    # persistence --------------------------------------------------------------------------------------

    def _save(self) -> None:
        path = self.root.key_logins_state
        try:
            if not self.proofs:
                path.unlink(missing_ok=True)
                return
            fs.ensure_dir(path.parent, 0o755)
            data = {user: asdict(proof) for user, proof in sorted(self.proofs.items())}
            fs.atomic_write(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), mode=0o600)
        except OSError as exc:
            self.problem = f"cannot save {self.root.system_name(path)}: {exc}"

    def _load(self) -> tuple[dict[str, KeyProof], str | None]:
        path = self.root.key_logins_state
        try:
            raw = fs.read_regular(path)
            if raw is None:
                return {}, None
            data: dict[str, Any] = json.loads(raw)
            proofs = {}
            for user, fields in data.items():
                proof = KeyProof(
                    str(fields["user"]),
                    str(fields["how"]),
                    float(fields["at"]),
                    str(fields.get("fingerprint", "")),
                    int(fields.get("keys_offered", 0)),
                    tuple((str(name), str(value)) for name, value in fields.get("algorithms", ())),
                )
                if proof.user != user:
                    raise ValueError(f"entry {user!r} names user {proof.user!r}")
                proofs[user] = proof
            return proofs, None
        except (fs.UnsafeFile, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            # unreadable: the safe reading is "nothing proven", so passwords stay on until a key logs in again
            return {}, f"{self.root.system_name(path)}: unreadable, key logins must be proven again ({exc})"
