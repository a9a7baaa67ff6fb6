"""Who may drive the server from a browser: the checks on Host, Origin and Content-Type that keep a web page
the user happens to visit from using a keyless server (docs/architecture.md, infer/).

Without an API key, the only thing between a local server and any web page is the browser's same-origin
policy, and two holes go through it:
- cross-site requests: a page may POST `text/plain` (no CORS preflight) to http://127.0.0.1:PORT and make
  the model generate (the reply stays unreadable, but the work is done). A browser names the page in the
  `Origin` header, and the CORS-safe body types are not JSON: so a foreign Origin is refused, and POST
  bodies must be `application/json` (a type a cross-site page cannot send without a preflight, which this
  server never answers with CORS headers).
- DNS rebinding: evil.example resolves first to the attacker, then to 127.0.0.1; the page is then
  same-origin with "the server" and can read replies. Its requests still carry `Host: evil.example:PORT`,
  so a keyless server answers only Host names it knows: loopback names (localhost, *.localhost), IP
  literals (a rebinding needs a name the attacker controls; an address names no one), the --host it was
  given, and --allowed-hosts.
The chat page's own requests pass: same-origin, so Origin (when sent) equals http://HOST, and JSON bodies.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit


def host_name(value: str) -> str:
    """The name in a Host header value, lowercased, without the port: "[::1]:8000" -> "::1"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str] | None:
    """The Host names a keyless server answers besides loopback names and IP literals; None: any ("*")."""
    names = {host_name(h) for h in (host, *extra) if h}
    return None if "*" in names else frozenset(names)


def host_ok(value: str | None, allowed: frozenset[str] | None) -> bool:
    if allowed is None:
        return True
    if not value:
        return False  # HTTP/1.1 requires Host; a request without one comes from no browser
    name = host_name(value)
    return name == "localhost" or name.endswith(".localhost") or _is_address(name) or name in allowed


def origin_ok(origin: str | None, host: str | None) -> bool:
    """No Origin (not a browser, or a same-origin GET), or this very server's origin: http(s)://HOST."""
    if origin is None:
        return True
    try:
        url = urlsplit(origin)
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(host) and url.netloc.lower() == host.strip().lower()


def json_body(content_type: str | None) -> bool:
    """Whether a Content-Type header names JSON: "application/json", with or without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower() == "application/json"


# --- who may serve without a key, and where the key comes from
class InsecureServe(ValueError):
    """Serving beyond this host without an API key, and without saying so on purpose."""


def check_exposure(host: str, api_key: str | None, insecure_no_api_key: bool = False) -> None:
    """InsecureServe when `host` is reachable from other machines and nothing guards it."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name, or "" (every interface)
        loopback = False
    if not (api_key or insecure_no_api_key or loopback):
        raise InsecureServe(f"refusing to serve on {host!r} without an API key: anyone who can reach it could use "
                            f"the model. Pass --api-key KEY (clients send 'Authorization: Bearer KEY'), bind to "
                            f"127.0.0.1, or pass --insecure-no-api-key to serve it openly on purpose.")


KEY_ENV = "FRUGALLM_API_KEY"


def api_key_from(api_key: str | None = None, api_key_file: str | None = None) -> str | None:
    """The server's key: `api_key`, else the first line of `api_key_file`, else $FRUGALLM_API_KEY, else None.
    A key on the command line shows in `ps` to every user of the machine; a file or the environment does not."""
    if api_key and api_key_file:
        raise ValueError("give the API key once: --api-key or --api-key-file, not both")
    if api_key_file:
        try:
            key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeError) as e:
            raise ValueError(f"cannot read the API key file {api_key_file}: {e}; write the key on its first "
                             f"line (e.g. `umask 077; openssl rand -hex 24 > {api_key_file}`)") from None
        if not key or "\n" in key:
            raise ValueError(f"the API key file {api_key_file} must hold the key alone on one line")
        return key
    return api_key or os.environ.get(KEY_ENV) or None
