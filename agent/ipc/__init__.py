"""The local control socket: a JSON-lines protocol over a Unix stream socket, with SO_PEERCRED checks.

Wire format (one request per connection):
  client -> {"verb": "status", "args": {...}}\\n
  server -> {"ok": true, "result": <json>}\\n                       then closes, or
            {"ok": false, "error": "<message>"}\\n                   then closes, or
            {"ok": true, "stream": true}\\n then {"item": {...}}\\n per item until the stream ends;
            a stream that fails part-way ends with {"error": "<message>"}\\n.
A streaming handler returns an iterator of JSON objects; it may also yield None (nothing new, nothing
sent), the server's chance to end a stream whose client has gone before the next item would show it.

Every connection costs the agent an fd and a thread, so what a client may hold is capped (DESIGN.md,
"Who we defend against": a member of adm may connect): per uid, for all uids but root together, and
for root on its own, so root is always served; `events --follow` streams per uid; and the whole request
line must arrive within REQUEST_DEADLINE of accept(). A client over a cap gets one error line, then the
close. LimitNOFILE= and TasksMax= in systemd/vps-agent.service are sized from these caps.
"""

from agent.ipc.client import CONNECT_RETRY_PAUSE, IpcClient
from agent.ipc.connection import MAX_DISCARDED_BYTES
from agent.ipc.server import (
    ACCEPT_BACKOFF_MAX,
    ACCEPT_BACKOFF_MIN,
    CONNECTION_JOIN_TIMEOUT,
    LISTEN_BACKLOG,
    LOG_PERIOD,
    MAX_CONNECTIONS_PER_UID,
    MAX_ROOT_CONNECTIONS,
    MAX_STREAMS_PER_UID,
    MAX_UNPRIVILEGED_CONNECTIONS,
    REQUEST_DEADLINE,
    IpcServer,
)
from agent.ipc.wire import (
    MAX_ANSWER_LINE_BYTES,
    MAX_REQUEST_BYTES,
    MUTATING_VERBS,
    DaemonUnreachable,
    Handler,
    IpcError,
    PeerCred,
    Request,
)

__all__ = [
    "ACCEPT_BACKOFF_MAX",
    "ACCEPT_BACKOFF_MIN",
    "CONNECTION_JOIN_TIMEOUT",
    "CONNECT_RETRY_PAUSE",
    "LISTEN_BACKLOG",
    "LOG_PERIOD",
    "MAX_ANSWER_LINE_BYTES",
    "MAX_CONNECTIONS_PER_UID",
    "MAX_DISCARDED_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_ROOT_CONNECTIONS",
    "MAX_STREAMS_PER_UID",
    "MAX_UNPRIVILEGED_CONNECTIONS",
    "MUTATING_VERBS",
    "REQUEST_DEADLINE",
    "DaemonUnreachable",
    "Handler",
    "IpcClient",
    "IpcError",
    "IpcServer",
    "PeerCred",
    "Request",
]
