"""Where the API key and the service address come from, and the rules for sending the key."""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from ._constants import ENV_STORE_DIR
from .contract import STANDIN_HEADER as STANDIN_HEADER  # the client reads it; the stand-in sends it
from .errors import ConfigurationError, InsecureURLError, MissingAPIKeyError

ENV_API_KEY = "AITHRIVING_API_KEY"
ENV_API_KEY_FILE = "AITHRIVING_API_KEY_FILE"
ENV_BASE_URL = "AITHRIVING_BASE_URL"
DEFAULT_BASE_URL = "https://www.aithriving.com"
# The key file's place on Linux, and on Windows and macOS before they got their own (still read there
# when it holds a key or settings and the platform's folder does not exist yet).
DEFAULT_KEY_FILE = "~/.config/aithriving/api_key"
KEY_FILE_NAME = "api_key"
# The stand-in marks every answer with this header; results carrying it cost nothing.


class APIKey:
    """The key, wrapped so that printing, logging or repr never shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        value = value.strip()
        if not value:
            raise MissingAPIKeyError(_missing_key_message())
        if any(ch in value for ch in "\r\n\0"):
            raise ConfigurationError(
                "The API key contains a line break or NUL character; store it on one line."
            )
        # A header value must be plain ASCII: anything else would fail deep in http.client, with the
        # key in the exception's args. The message names a position, never a character of the key.
        for position, ch in enumerate(value):
            if not " " <= ch <= "~":
                raise ConfigurationError(
                    f"The API key has a character that is not plain ASCII text at position {position + 1}; "
                    "copy the key again from your account page."
                )
        self._value = value

    def reveal(self) -> str:
        """Return the raw key, for the one place that puts it in the request header."""
        return self._value

    def __repr__(self) -> str:
        return "APIKey('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, APIKey) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("APIKey", self._value))

    def __reduce__(self):
        # Pickling would copy the key into caches and queues; refuse it.
        raise TypeError("APIKey cannot be pickled")


def _missing_key_message(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if env.get(ENV_API_KEY_FILE):
        return (
            f"No API key found: set the {ENV_API_KEY} environment variable, or put the key in "
            f"{key_file_path(env)} (the file named by {ENV_API_KEY_FILE}), which does not exist."
        )
    default = default_key_file(env)
    shown = DEFAULT_KEY_FILE if default == Path(DEFAULT_KEY_FILE).expanduser() else str(default)
    return (
        f"No API key found: set the {ENV_API_KEY} environment variable, "
        f"or put the key in {shown} (or in the file named by {ENV_API_KEY_FILE})."
    )


def platform_config_folder(environ: Mapping[str, str] | None = None) -> Path:
    """Return the pack's folder in the user's config folder: %APPDATA%\\aithriving on Windows,
    ~/Library/Application Support/aithriving on macOS, ~/.config/aithriving elsewhere."""
    env = os.environ if environ is None else environ
    if sys.platform == "win32":
        return Path(env.get("APPDATA") or Path.home() / "AppData" / "Roaming") / "aithriving"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "aithriving"
    return Path(DEFAULT_KEY_FILE).expanduser().parent


def default_key_file(environ: Mapping[str, str] | None = None) -> Path:
    """Return the key file's default place: the platform's config folder, or ~/.config/aithriving if used."""
    folder = platform_config_folder(environ)
    legacy = Path(DEFAULT_KEY_FILE).expanduser().parent
    if (
        folder != legacy
        and not folder.exists()
        and any((legacy / name).is_file() for name in (KEY_FILE_NAME, "aithriving-settings.json"))
    ):
        folder = legacy  # an earlier version kept the key (or the offline switch) there: keep reading it
    return folder / KEY_FILE_NAME


def key_file_path(environ: Mapping[str, str] | None = None) -> Path:
    """Return the key file this environment points at."""
    env = os.environ if environ is None else environ
    named = env.get(ENV_API_KEY_FILE)
    return Path(named).expanduser() if named else default_key_file(env)


def load_api_key(environ: Mapping[str, str] | None = None) -> APIKey:
    """Load the key from AITHRIVING_API_KEY, else from the key file; fail before any network I/O."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_API_KEY, "").strip()
    if value:
        return APIKey(value)
    path = key_file_path(env)
    return APIKey(_read_key_file(path, env))


_MAX_KEY_FILE_BYTES = 64 * 1024


def _read_key_file(path: Path, environ: Mapping[str, str] | None = None) -> str:
    """Read the key on the first line of ``path``; an error naming the file when it cannot be one."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_KEY_FILE_BYTES)
    except FileNotFoundError:
        raise MissingAPIKeyError(_missing_key_message(environ)) from None
    except OSError as exc:
        # The path is the user's own; the exception text never holds file contents.
        raise ConfigurationError(
            f"The API key file {path} could not be read ({type(exc).__name__}); check its permissions."
        ) from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\0" in raw:
        raise ConfigurationError(
            f"The API key file {path} is saved as UTF-16; save it as plain text (ASCII or UTF-8)."
        )
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ConfigurationError(
            f"The API key file {path} starts with a byte-order mark (saved as 'UTF-8 with BOM'); "
            "save it as plain text without one."
        )
    first_line = raw.split(b"\n", 1)[0].strip()
    if not first_line:
        raise MissingAPIKeyError(f"The API key file {path} is empty; put the key on its first line.")
    if any(byte < 0x20 or byte > 0x7E for byte in first_line):
        raise ConfigurationError(
            f"The API key file {path} has characters on its first line that are not plain ASCII text; "
            "put only the key there."
        )
    return first_line.decode("ascii")


def resolve_base_url(environ: Mapping[str, str] | None = None) -> str:
    """Return the service's base URL from AITHRIVING_BASE_URL, else the default, without a trailing slash."""
    env = os.environ if environ is None else environ
    return check_base_url(env.get(ENV_BASE_URL) or DEFAULT_BASE_URL, ENV_BASE_URL)


def check_base_url(value: str, source: str = "base_url") -> str:
    """``value`` as a base URL (no trailing slash), or a ConfigurationError naming ``source``."""
    if not isinstance(value, str):
        raise ConfigurationError(f"{source} must be an http(s) address given as text.")
    url = value.strip().rstrip("/")
    # The value is never repeated in these messages: a key pasted into the wrong variable
    # would be printed back.
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # a broken IPv6 literal such as http://[::1
        raise ConfigurationError(
            f"{source} has a broken host (an IPv6 address goes in brackets, as in http://[2001:db8::5]:8765)."
        ) from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise ConfigurationError(
            f"{source} must be an http(s) address such as {DEFAULT_BASE_URL}; "
            f"the value set ({len(url)} characters) is not one."
        )
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigurationError(f"{source} has a port that is not a number from 1 to 65535.")
    if parts.username or parts.password:
        raise ConfigurationError(f"{source} must not contain a user name or password.")
    return url


def is_loopback_host(host: str) -> bool:
    """Tell whether ``host`` is localhost or a loopback address, which never leaves this machine."""
    host = host.strip("[]").lower()
    # Only the exact name: *.localhost is loopback only where the resolver pins it.
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_key_may_travel(url: str) -> None:
    """Refuse to send the key in clear text (plain http) to any host but this machine."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        return
    raise InsecureURLError(
        f"Refusing to send the API key over plain http to {parts.hostname}; "
        f"use an https:// address in {ENV_BASE_URL} (plain http is allowed only for 127.0.0.1/localhost)."
    )


_DISABLED_VALUES = {"", "0", "off", "none", "false", "no"}


def default_store_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """Return the store's folder: AITHRIVING_CACHE_DIR (``off``: none), else the platform's user cache."""
    env = os.environ if environ is None else environ
    if ENV_STORE_DIR in env:
        value = env[ENV_STORE_DIR].strip()
        return None if value.lower() in _DISABLED_VALUES else Path(value).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "aithriving" / "structure"
    legacy = Path(os.path.expanduser("~")) / ".cache" / "aithriving" / "structure"
    if sys.platform == "win32":
        local = Path(env.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        folder = local / "aithriving" / "structure"
    elif sys.platform == "darwin":
        folder = Path.home() / "Library" / "Caches" / "aithriving" / "structure"
    else:
        return legacy
    # An earlier version kept results in ~/.cache on every platform: they stay where they are, and used.
    return legacy if legacy.is_dir() and not folder.exists() else folder
