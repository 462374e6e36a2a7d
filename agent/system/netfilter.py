"""The door to the kernel's packet filter: which iptables flavour is in use, its save/restore tools,
the netlink group that announces every ruleset change, and the sockets processes listen on."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.system.run import Completed, run

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7  # every nf_tables commit (iptables-nft and nft alike) is announced here
FAMILIES = ("ipv4", "ipv6")
_TOOL = {"ipv4": "iptables", "ipv6": "ip6tables"}
# TEST HOOK, not configuration: the integration tests run the daemon in a private netns and pick the
# backend there (Debian's iptables alternative is per-system, so a test cannot switch it for one netns).
# Values: iptables-nft, iptables-legacy, nftables. Unset in production: the backend is detected.
BACKEND_TEST_HOOK = "VPS_AGENT_TEST_FIREWALL_BACKEND"
LEGACY_TABLES = {"ipv4": Path("/proc/net/ip_tables_names"), "ipv6": Path("/proc/net/ip6_tables_names")}


@dataclass(frozen=True)
class Backend:
    """nft: iptables-nft (events through netlink); legacy: iptables-legacy (no events: poll);
    nftables: nft without iptables; none: no tool at all."""

    name: str
    version: str = ""

    @property
    def iptables(self) -> bool:
        return self.name in ("nft", "legacy")

    def tool(self, family: str, suffix: str = "") -> str:
        """e.g. tool("ipv6", "save") -> "ip6tables-nft-save"."""
        return f"{_TOOL[family]}-{self.name}" + (f"-{suffix}" if suffix else "")


def detect_backend() -> Backend:
    """`iptables -V` says "(nf_tables)" or "(legacy)" (which flavour Debian's alternative points to);
    with no iptables but nft, native nftables. The test hook (BACKEND_TEST_HOOK) names one instead."""
    forced = os.environ.get(BACKEND_TEST_HOOK, "")
    if forced in ("iptables-nft", "iptables-legacy"):
        result = run([f"iptables-{forced.split('-')[1]}", "-V"], timeout=10)
        if result.ok:
            return Backend(forced.split("-")[1], result.stdout.strip())
        return Backend("none")
    if forced == "nftables":
        nft = run(["nft", "--version"], timeout=10)
        return Backend("nftables", nft.stdout.strip()) if nft.ok else Backend("none")
    result = run(["iptables", "-V"], timeout=10)
    if result.ok:
        text = result.stdout.strip()
        return Backend("legacy" if "(legacy)" in text else "nft", text)
    nft = run(["nft", "--version"], timeout=10)
    if nft.ok:
        return Backend("nftables", nft.stdout.strip())
    return Backend("none")


def save_filter(backend: Backend, family: str) -> Completed:
    return run([backend.tool(family, "save"), "-t", "filter"], timeout=15)


def restore_argv(backend: Backend, family: str, *, test: bool = False) -> tuple[str, ...]:
    argv = [backend.tool(family, "restore"), "--noflush"]
    if backend.name == "legacy":
        argv += ["--wait", "5"]  # legacy serialises writers with the xtables lock; nft commits atomically
    if test:
        argv.append("--test")
    return tuple(argv)


def legacy_filter_present(family: str) -> bool:
    """Whether iptables-legacy holds a filter table in this netns; read from /proc, so asking never
    loads the legacy modules."""
    try:
        names = LEGACY_TABLES[family].read_text().split()
    except OSError:
        return False
    return "filter" in names


NFT_TABLE = ("inet", "vps_agent")  # native nftables: the agent's own table, nothing else


def nft_list_table() -> Completed:
    """`nft list table inet vps_agent`: fails with "No such file or directory" when there is none."""
    return run(["nft", "list", "table", *NFT_TABLE], timeout=15)


def nft_table_missing(result: Completed) -> bool:
    return not result.ok and "No such file or directory" in result.stderr


def nft_apply_argv(*, check: bool = False) -> tuple[str, ...]:
    """nft reads the whole file as one batch: one kernel transaction, all or nothing."""
    return ("nft", *(["-c"] if check else []), "-f", "-")


def tool_name(family: str) -> str:
    return _TOOL[family]


def save_filter_with(flavour: str, family: str) -> Completed:
    return run([f"{_TOOL[family]}-{flavour}-save", "-t", "filter"], timeout=15)


def in_host_network_namespace() -> bool:
    """Whether this process shares PID 1's network namespace (a fake root must not touch the host's)."""
    mine = os.stat("/proc/self/ns/net").st_ino
    try:
        return mine == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        pass
    # PID 1's namespaces can be hidden (some sandboxes): a namespace of our own shows in an ancestor
    # living in another one; anything unproven counts as the host's
    pid = os.getppid()
    while pid > 1:
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino != mine:
                return False
            pid = _parent_pid(pid)
        except (OSError, ValueError):
            break
    return True


def _parent_pid(pid: int) -> int:
    """The 4th field of /proc/PID/stat (after the command name, which may hold spaces and parentheses)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


@dataclass(frozen=True)
class Listening:
    """The TCP sockets processes of one name listen on in this network namespace (tcp_listening)."""

    ports: frozenset[int]  # ports of the listening sockets in those processes' fd tables
    hidden: bool  # one of them would not show its fd table (non-dumpable: reading it needs CAP_SYS_PTRACE)
    root_ports: frozenset[int]  # when hidden: every port a socket owned by uid 0 listens on here


def tcp_listening(process_name: str, executables: frozenset[str], proc: Path = Path("/proc")) -> Listening:
    """What root's processes named process_name, running one of executables, listen on in this network
    namespace. A name is anyone's to set (prctl PR_SET_NAME, or exec -a), so a process counts only if it
    runs as root (real and effective uid 0, from /proc/PID/status, which anyone may read) and, where
    /proc/PID/exe can be read, runs one of executables (sshd hides it: non-dumpable, as its fds).

    Reads /proc directly: the processes' socket inodes first, the listening sockets only when there
    are any (or a process hid its own); psutil.net_connections walks every process and costs more
    than a whole firewall heal."""
    sockets: set[int] = set()
    hidden = False
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/comm") as comm:
                if comm.read().strip() != process_name:
                    continue
            if not _runs_as_root(Path(entry.path)):
                continue  # anyone's process may call itself sshd: never sshd's ports
            try:
                exe = os.readlink(f"{entry.path}/exe").removesuffix(" (deleted)")  # upgraded, not restarted
            except PermissionError:
                exe = None  # non-dumpable: its fds are hidden too, below
            if exe is not None and exe not in executables:
                continue
            sockets |= _socket_inodes(entry.path)
        except PermissionError:
            hidden = True  # EACCES/EPERM: a non-dumpable process and no CAP_SYS_PTRACE
        except OSError:
            continue  # the process ended
    if not sockets and not hidden:
        return Listening(frozenset(), False, frozenset())
    table = tcp_listeners()
    ports = frozenset(port for inode, (port, _) in table.items() if inode in sockets)
    root_ports = frozenset(port for port, uid in table.values() if uid == 0) if hidden else frozenset()
    return Listening(ports, hidden, root_ports)


def _socket_inodes(process: str) -> set[int]:
    """The inodes of the sockets in a process's fd table (PermissionError: non-dumpable, or another
    user's process and no CAP_SYS_PTRACE)."""
    found = set()
    for fd in os.scandir(f"{process}/fd"):
        try:
            target = os.readlink(fd.path)
        except FileNotFoundError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def _runs_as_root(process: Path) -> bool:
    """Real and effective uid 0 (/proc/PID/status: world-readable, even for a non-dumpable process)."""
    with open(process / "status") as status:
        for line in status:
            if line.startswith("Uid:"):
                real, effective = line.split()[1:3]
                return real == effective == "0"
    return False


@dataclass(frozen=True)
class OpenSocket:
    """A socket that takes packets from anyone: a listening TCP socket, or an unconnected bound UDP one."""

    proto: str  # "tcp" or "udp"
    address: str  # the local address, e.g. 0.0.0.0, ::, 10.0.0.5
    port: int
    uid: int  # its owner
    inode: int
    cgroup: int = 0  # the cgroup (v2) id of the process that made it (sock_diag's INET_DIAG_CGROUP_ID), 0: unknown

    @property
    def loopback(self) -> bool:
        address = ipaddress.ip_address(self.address)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.is_loopback


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_NLM_F_DUMP_REQUEST = 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_UDP_UNCONNECTED = 7  # TCP_CLOSE: a bound UDP socket with no peer (a connected one is TCP_ESTABLISHED)
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_DIAG_REQUEST = struct.Struct("=BBBBI48x")  # struct inet_diag_req_v2: family, protocol, ext, pad, states, id
_DIAG_PORT = struct.Struct("!H")  # inet_diag_msg.id.idiag_sport, at 4
_DIAG_SOURCE = 8  # inet_diag_msg.id.idiag_src: 16 bytes (an IPv4 address in the first 4)
_DIAG_OWNER = struct.Struct("=II")  # inet_diag_msg.idiag_uid and idiag_inode, at 64
_DIAG_MESSAGE_SIZE = 72  # struct inet_diag_msg
_ATTRIBUTE = struct.Struct("=HH")  # struct rtattr: length, type (after inet_diag_msg, 4-aligned)
_INET_DIAG_CGROUP_ID = 21  # a u64 the kernel adds (5.7+) to every socket it reports
_PROTOCOLS = {"tcp": (socket.IPPROTO_TCP, _TCP_LISTEN), "udp": (socket.IPPROTO_UDP, _UDP_UNCONNECTED)}


def tcp_listeners() -> dict[int, tuple[int, int]]:
    """socket inode -> (port, owner uid) of every listening TCP socket (IPv4 and IPv6) in this network
    namespace. Asks sock_diag for listening sockets only (0.05 ms); reading /proc/net/tcp and tcp6
    walks the whole connection hash table, 6.6 ms on a 2-CPU VM holding 4 sockets (measured)."""
    return {s.inode: (s.port, s.uid) for s in open_sockets(("tcp",))}


def open_sockets(protos: tuple[str, ...] = ("tcp", "udp")) -> list[OpenSocket]:
    """Every listening TCP and unconnected bound UDP socket (IPv4 and IPv6) in this network namespace,
    loopback ones included: sock_diag, or /proc/net/* on a kernel without inet_diag."""
    found: list[OpenSocket] = []
    for proto in protos:
        try:
            found += _sock_diag(socket.AF_INET, proto) + _sock_diag(socket.AF_INET6, proto)
        except OSError:
            found += _proc_net_sockets(proto)
    return found


def _sock_diag(family: int, proto: str) -> list[OpenSocket]:
    found: list[OpenSocket] = []
    protocol, state = _PROTOCOLS[proto]
    size = 4 if family == socket.AF_INET else 16
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(5.0)  # the kernel answers at once; a timeout is an OSError: /proc/net/tcp then
        request = _DIAG_REQUEST.pack(family, protocol, 0, 0, 1 << state)
        sock.sendto(
            _HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, _NLM_F_DUMP_REQUEST, 1, 0) + request, (0, 0)
        )
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind = _HEADER.unpack_from(data, offset)[:2]
                body = offset + _HEADER.size
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR or length < _HEADER.size:
                    error = -struct.unpack_from("=i", data, body)[0] if kind == _NLMSG_ERROR else 0
                    raise OSError(error, f"sock_diag: {os.strerror(error) if error else 'a malformed message'}")
                if kind == SOCK_DIAG_BY_FAMILY and length >= _HEADER.size + _DIAG_MESSAGE_SIZE:
                    (port,) = _DIAG_PORT.unpack_from(data, body + 4)
                    raw = data[body + _DIAG_SOURCE : body + _DIAG_SOURCE + size]
                    address = str(ipaddress.ip_address(raw))
                    uid, inode = _DIAG_OWNER.unpack_from(data, body + 64)
                    cgroup = _cgroup_attribute(data, body + _DIAG_MESSAGE_SIZE, offset + length)
                    found.append(OpenSocket(proto, address, port, uid, inode, cgroup))
                offset += (length + 3) & ~3  # NLMSG_ALIGN


def _cgroup_attribute(data: bytes, start: int, end: int) -> int:
    while start + _ATTRIBUTE.size <= end:
        length, kind = _ATTRIBUTE.unpack_from(data, start)
        if length < _ATTRIBUTE.size:
            break
        if kind == _INET_DIAG_CGROUP_ID and length >= _ATTRIBUTE.size + 8:
            return int(struct.unpack_from("=Q", data, start + _ATTRIBUTE.size)[0])
        start += (length + 3) & ~3
    return 0


def cgroup_paths(ids: set[int], base: Path = Path("/sys/fs/cgroup")) -> dict[int, str]:
    """cgroup v2 id -> its path below base (e.g. "system.slice/nginx.service"): a cgroup's id is its
    directory's inode number. What the agent may not read of a process's fds, its socket's cgroup tells."""
    found: dict[int, str] = {}
    wanted = set(ids) - {0}
    if not (base / "cgroup.controllers").exists():  # not cgroup v2 there: its unified hierarchy, if any
        base = base / "unified"
        if not (base / "cgroup.controllers").exists():
            return found
    for directory, _, _ in os.walk(base):
        if not wanted:
            break
        try:
            inode = os.stat(directory).st_ino
        except OSError:
            continue
        if inode in wanted:
            wanted.discard(inode)
            if directory != str(base):  # the root cgroup names no unit
                found[inode] = os.path.relpath(directory, base)
    return found


def _proc_net_listeners() -> dict[int, tuple[int, int]]:
    return {s.inode: (s.port, s.uid) for s in _proc_net_sockets("tcp")}


def _proc_net_sockets(proto: str) -> list[OpenSocket]:
    state = "0A" if proto == "tcp" else "07"  # TCP_LISTEN; TCP_CLOSE for an unconnected UDP socket
    found: list[OpenSocket] = []
    for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        try:
            with open(table) as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == state:
                        address, port = fields[1].rsplit(":", 1)
                        uid, inode = int(fields[7]), int(fields[9])
                        found.append(OpenSocket(proto, _proc_address(address), int(port, 16), uid, inode))
        except OSError:
            continue
    return found


def _proc_address(text: str) -> str:
    """/proc/net/tcp's address: the kernel's 32-bit words in host byte order, as hex."""
    raw = bytes.fromhex(text)
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    return str(ipaddress.ip_address(b"".join(w[::-1] if sys.byteorder == "little" else w for w in words)))


def socket_processes(inodes: set[int], proc: Path = Path("/proc")) -> dict[int, set[str]]:
    """socket inode -> the names of the processes holding it. A process whose fd table the agent may
    not read (another user's, without CAP_SYS_PTRACE; a non-dumpable one) is missing from the answer."""
    found: dict[int, set[str]] = {}
    if not inodes:
        return found
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            held = _socket_inodes(entry.path) & inodes
            if held:
                with open(f"{entry.path}/comm") as comm:
                    name = comm.read().strip()
                for inode in held:
                    found.setdefault(inode, set()).add(name)
        except OSError:
            continue  # not ours to read, or the process ended
    return found


def netlink_subscribe(protocol: int, group: int) -> socket.socket:
    """A netlink socket that receives the multicast group's messages (groups are numbered from 1)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 1 << (group - 1)))
    except OSError:
        sock.close()
        raise
    return sock
