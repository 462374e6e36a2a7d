"""What the accounts guard observes and wants: the admin's state, unsafe login files, where findings point."""

from __future__ import annotations

from dataclasses import dataclass

from agent import accounts
from agent.paths import SystemRoot

SUDO_GROUP = "sudo"
SHELL = "/bin/bash"
COMMENT = "admin created by vps-agent"  # the GECOS field: no commas, no colons
KEYS_FILE = ".ssh/authorized_keys"  # where the agent adds the configured keys, under the admin's home
DEFAULT_KEYS_FILES = (".ssh/authorized_keys", ".ssh/authorized_keys2")  # Debian's AuthorizedKeysFile
TIMEOUT = 60.0
# where findings point, as the guarded system names them
_SYSTEM = SystemRoot()
PASSWD, SHADOW, GROUP, SUDOERS = (str(p) for p in (_SYSTEM.passwd, _SYSTEM.shadow, _SYSTEM.group, _SYSTEM.sudoers))


@dataclass(frozen=True)
class AccountsDesired:
    admin_user: str | None
    create_admin: bool
    admin_keys: tuple[str, ...]
    policy: accounts.AccessPolicy  # how sshd lets admins in under the SSH baseline the agent keeps


@dataclass(frozen=True)
class UnsafePath:
    """A home directory or authorized_keys (or a directory between them) others can write or own."""

    account: str
    path: str  # as the system names it
    why: str  # "is writable by others (mode 0777)"


@dataclass(frozen=True)
class AdminState:
    name: str
    account: accounts.Account | None  # None: it does not exist
    access: accounts.Access | None
    in_sudo_group: bool
    home: str  # its home (for a missing one: where useradd will make it)
    home_exists: bool
    keys_text: str | None  # ~/.ssh/authorized_keys as it is now (None: missing or unreadable)
    keys_unwritable: str | None  # why the agent will not write its keys there (None: it may)
    new_id: int | None = None  # a missing admin: the uid and gid useradd is to give it (None: none free)


@dataclass(frozen=True)
class AccountsObserved:
    facts: accounts.AccountsFacts
    installed: accounts.InstallDate | None
    unsafe: tuple[UnsafePath, ...]
    admin: AdminState | None  # None: no accounts.admin_user in the config
    sudo_group: bool  # the group exists
