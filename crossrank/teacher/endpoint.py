"""Where a teacher request may go and with which secret: `--base-url` parsed and redacted, the API key's
host rules, Basic credentials from the URL, and the proxy rules (never a key through a plain-http proxy)."""
from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
import urllib.parse
import urllib.request

from crossrank.errors import CrossrankError


OPENAI_KEY_ENV, OPENAI_HOST = "OPENAI_API_KEY", "api.openai.com"


# ---------------------------------------------------------------------------------------------------------
# URLs, credentials, proxies


def redact_url(url: str) -> str:
    """`url` as it may be shown or stored. Everything between `scheme://` and the last `@` (the userinfo,
    `user:password@`, also when the password holds an unencoded `/`, `?`, `#` or `@`) becomes `***`, and a
    query or fragment (`?api_key=...`) becomes `?***`. The one redaction of --base-url, proxy URLs and
    Location headers, wherever they are printed, logged or written."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    if at >= 0:
        rest = "***@" + rest[at + 1:]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[:cut + 1] + "***"
    return f"{scheme}{sep}{rest}"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """An http(s) URL taken apart: where to connect, the path to ask for, the credentials of its userinfo."""
    scheme: str
    host: str  # IPv6 without brackets
    port: int
    path: str  # without a trailing slash, percent-encoded
    username: str = ""
    password: str = ""
    shown: str = ""  # redact_url of the URL

    @property
    def loopback(self) -> bool:
        return _is_loopback(self.host)

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.password)


def parse_url(url: str, what: str = "--base-url", any_scheme: bool = False) -> Endpoint:
    """`url` as an Endpoint, or one line naming `what` (the URL shown redacted; the parser's own message is not
    quoted: it may hold part of a password). Only http(s) URLs unless `any_scheme` (a proxy's, checked by
    the caller)."""
    shown, problem, parts, port = redact_url(url), "", None, None
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        problem = "it holds a space or a control character"
    else:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            problem = "its host or port cannot be read"
    if parts is not None and not problem:
        if parts.scheme not in ("http", "https") and not any_scheme:
            problem = "it is not an http:// or https:// URL"
        elif not parts.hostname:
            problem = "it has no host"
        elif parts.query or parts.fragment:
            problem = "it has a query or fragment (the API path is appended to the URL)"
    if problem:
        raise CrossrankError(f"{what} {shown} is invalid: {problem} (expected http(s)://host[:port]/path)")
    path = urllib.parse.quote(parts.path.rstrip("/"), safe="/%:@!$&'()*+,;=-._~")
    return Endpoint(parts.scheme, parts.hostname, port or {"https": 443, "http": 80}.get(parts.scheme, 0), path,
                    urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or ""), shown)


def api_key_for(base_url: str, api_key_env: str) -> tuple[str, str]:
    """(variable, key) to send to `base_url`, ("", "") for none.

    The default variable ($OPENAI_API_KEY, exported for OpenAI) goes to the OpenAI API over https only, so a
    vLLM or proxy URL does not receive it by accident; a variable the user names goes to any host, but a set
    key never travels in clear text (plain http) to a host that is not loopback.
    """
    url = parse_url(base_url)
    if not api_key_env:
        if url.scheme == "https" and url.host == OPENAI_HOST:
            return OPENAI_KEY_ENV, _checked_key(OPENAI_KEY_ENV)
        return "", ""
    key = _checked_key(api_key_env)
    if key and url.scheme != "https" and not url.loopback:
        raise CrossrankError(f"--base-url {url.shown}: refusing to send ${api_key_env} over plain http to a host "
                             f"that is not loopback (expected an https:// URL, or http:// to localhost)")
    return api_key_env, key


def _checked_key(variable: str) -> str:
    key = os.environ.get(variable, "")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):  # a line break would split the header (or be refused)
        raise CrossrankError(f"${variable} holds a line break or a control character (expected the key alone)")
    return key


@dataclasses.dataclass(frozen=True)
class Credentials:
    variable: str  # the API key's variable, "" for none
    authorization: str  # the Authorization header's value, "" for none
    secrets: tuple[str, ...]  # strings never to show: the key, the userinfo and its Basic form


def credentials_for(base_url: str, api_key_env: str) -> Credentials:
    """What `base_url` gets, checked before anything is sent or written: the API key (`api_key_for`) as a
    Bearer token, or else the userinfo of the URL as Basic authentication (as curl and requests send it),
    under the same rule: never in clear text to a host that is not loopback; never both."""
    url = parse_url(base_url)
    variable, key = api_key_for(base_url, api_key_env)
    if not url.has_credentials:
        return Credentials(variable, f"Bearer {key}" if key else "", (key,) if key else ())
    if key:
        raise CrossrankError(f"--base-url {url.shown}: it holds credentials (user:password@) and ${variable} is "
                             f"set: both would be the Authorization header (expected one of them)")
    if url.scheme != "https" and not url.loopback:
        raise CrossrankError(f"--base-url {url.shown}: refusing to send its credentials (user:password@) over "
                             f"plain http to a host that is not loopback (expected an https:// URL, or http:// "
                             f"to localhost)")
    pair = f"{url.username}:{url.password}"
    token = base64.b64encode(pair.encode()).decode()
    userinfo = base_url.partition("://")[2].rpartition("@")[0]
    return Credentials("", f"Basic {token}", secrets_of(userinfo, pair, url.password or url.username, token))


def secrets_of(*values: str) -> tuple[str, ...]:
    """The values worth redacting, longest first (so a password inside `user:password` goes with the rest);
    under 4 characters a value is no secret and replacing it would garble every message."""
    return tuple(sorted({v for v in values if len(v) >= 4}, key=len, reverse=True))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


PROXY_VARIABLES = {"https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
                   "http": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")}


def proxy_for(url: Endpoint) -> Endpoint | None:
    """The proxy the environment names for `url` (None: connect directly), as curl reads it ($https_proxy or
    $http_proxy by scheme, then $all_proxy; lower case first; $no_proxy honoured). A loopback host never goes
    through a proxy (Go's net/http rule): a key meant for this machine stays on it. The proxy must be http://
    (https URLs tunnel through it with CONNECT); another scheme (socks5://, https://) is refused, not bypassed:
    the user set it for a reason."""
    if url.loopback:
        return None
    name, value = next(((n, os.environ[n].strip()) for n in PROXY_VARIABLES[url.scheme]
                        if os.environ.get(n, "").strip()), ("", ""))
    if not value:
        return None
    no_proxy = (os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or "").strip()
    if no_proxy and urllib.request.proxy_bypass_environment(url.authority if ":" in url.host else url.host,
                                                            {"no": no_proxy}):
        return None
    proxy = parse_url(value if "://" in value else f"http://{value}", f"${name}", any_scheme=True)
    if proxy.scheme != "http":
        raise CrossrankError(f"${name} {proxy.shown}: a {proxy.scheme}:// proxy is not supported (expected "
                             f"http://host:port, or {url.host} in $no_proxy)")
    return proxy
