"""The client side toward upstreams: one session per process, with a connection pool that never
hands a request a kept-alive connection holding bytes nobody asked for."""

from __future__ import annotations

from typing import Any

import aiohttp

# A fresh connection is clean; only pooled ones can hold stray bytes. Past this many discarded
# connections in a row something is wrong with the connector itself: fail the exchange.
_MAX_DISCARDED = 16


class CleanPoolConnector(aiohttp.TCPConnector):
    """aiohttp's pool reuses an idle kept-alive connection even when the upstream has sent
    something on it since its last answer (a buggy service's second answer, a server's 408 on
    an idle connection). That stray answer would then be read as the answer to the next
    request: inbound, sealed and given to Google for another request. A connection with
    anything buffered, or marked to close, is closed here instead of being reused."""

    async def connect(self, req: Any, traces: Any, timeout: Any) -> aiohttp.connector.Connection:
        for _ in range(_MAX_DISCARDED):
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            if protocol is None or not protocol.should_close:
                return connection
            connection.close()  # closes the transport: never back into the pool
        raise aiohttp.ClientConnectionError("no clean upstream connection")


def upstream_session() -> aiohttp.ClientSession:
    """The process's client session: no pool limit, no environment proxies, bodies as sent
    (no decompression), no headers beyond what the proxy sets, timeouts set per exchange, and
    no cookie jar: the session serves every request of the process, and a cookie one answer
    sets (a load balancer's affinity cookie, say) would otherwise ride along on the next
    requests, whoever they come from."""
    return aiohttp.ClientSession(
        connector=CleanPoolConnector(limit=0, enable_cleanup_closed=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )
