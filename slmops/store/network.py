"""Where the server may fetch from: registry hosts that resolve to private, loopback, link-local or otherwise
internal addresses are refused unless the operator allows them (server-side request forgery: a pull request must
not make the server probe its own network or a cloud metadata endpoint)."""

from __future__ import annotations

import ipaddress
import socket

from slmops.types.errors import InvalidInput, SourceError


def internal(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def check_registry_host(host: str, allow_internal: bool = False) -> None:
    """Raise unless every address ``host`` (``name[:port]``) resolves to is a public one."""
    if allow_internal:
        return
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        infos = socket.getaddrinfo(name.strip("[]"), None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise SourceError(f'cannot resolve registry host "{name}"; check the model name') from None
    for info in infos:
        addr = str(info[4][0])
        if internal(addr):
            # The address itself stays out of the message: it would map the server's network for the caller.
            raise InvalidInput(f'registry host "{name}" resolves to an internal address; pulling from it is '
                               "refused (set SLMOPS_ALLOW_PRIVATE_REGISTRIES=true to allow)")
