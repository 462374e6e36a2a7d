"""Who can still get root over SSH: the facts behind the SSH guard's lockout invariants and the
accounts guard's findings.

Read from passwd, shadow, group, sudoers and authorized_keys under the SystemRoot. This is read-only:
both guards judge accounts with the same functions, so they never disagree about who can get in.
facts.py reads the account databases, logins.py judges who can log in and get root under a policy,
sessions.py lists the SSH sessions open now.
"""

from agent.accounts.facts import (
    ACCOUNT_FILES,
    KEY_TYPE,
    NOLOGIN_SHELLS,
    Account,
    AccountsFacts,
    InstallDate,
    SudoGrant,
    free_account_id,
    install_date,
    read_facts,
    watches,
)
from agent.accounts.logins import (
    Access,
    AccessPolicy,
    access,
    authorized_keys,
    authorized_keys_files,
    key_fingerprints,
    login_methods,
    strict_modes_problem,
    sudo_grant,
    unsafe_owner_or_mode,
    ways_to_root,
)
from agent.accounts.sessions import SshSession, admin_sessions, live_ssh_sessions

__all__ = [
    "ACCOUNT_FILES",
    "KEY_TYPE",
    "NOLOGIN_SHELLS",
    "Access",
    "AccessPolicy",
    "Account",
    "AccountsFacts",
    "InstallDate",
    "SshSession",
    "SudoGrant",
    "access",
    "admin_sessions",
    "authorized_keys",
    "authorized_keys_files",
    "free_account_id",
    "install_date",
    "key_fingerprints",
    "live_ssh_sessions",
    "login_methods",
    "read_facts",
    "strict_modes_problem",
    "sudo_grant",
    "unsafe_owner_or_mode",
    "watches",
    "ways_to_root",
]
