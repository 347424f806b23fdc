"""The pack's own settings, kept outside ComfyUI: the key file (write-only from the UI) and the offline mode.

Both live in the user's config folder (the key file's folder, by default ``~/.config/aithriving/``;
``%APPDATA%\\aithriving`` on Windows, ``~/Library/Application Support/aithriving`` on macOS),
never in a folder ComfyUI serves over HTTP (input, output, temp, user/, the custom nodes' web
folders) and never in a workflow or a PNG.
Nothing here reads or returns the key's value except to check it can be sent.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import (
    DEFAULT_KEY_FILE,
    ENV_API_KEY,
    ENV_API_KEY_FILE,
    key_file_path,
    load_api_key,
    platform_config_folder,
)
from .errors import ConfigurationError, StructureError
from .files import write_atomically

log = logging.getLogger("structure_api")

# Next to the key file, so one folder (and one permission) holds everything the pack keeps.
SETTINGS_FILE_NAME = "aithriving-settings.json"
# Real keys are tens of characters; anything this long was pasted by mistake (a whole file, a page).
MAX_KEY_CHARS = 1000
SOURCE_ENVIRONMENT = "environment"
SOURCE_KEY_FILE = "key file"


class KeyRefusedError(ConfigurationError):
    """The key given to save cannot be one (blank, not plain ASCII, too long); nothing was written."""


class KeyFromEnvironmentError(ConfigurationError):
    """AITHRIVING_API_KEY is set and wins over the key file: saving or removing the file changes nothing."""


class KeyFileLocationError(ConfigurationError):
    """The key file would land in a folder ComfyUI serves over HTTP (input, output, temp, user, web)."""


@dataclass(frozen=True)
class KeyStatus:
    """Whether a key is set and where it comes from; never the key or any part of it."""

    set: bool
    source: str | None  # "environment" | "key file" | None

    def as_json(self) -> dict:
        """Return the answer of GET /aithriving/key."""
        return {"set": self.set, "source": self.source}


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def key_status(environ: Mapping[str, str] | None = None) -> KeyStatus:
    """Where the next run would take its key from, by the same rules the client uses."""
    env = _env(environ)
    if env.get(ENV_API_KEY, "").strip():
        return KeyStatus(set=True, source=SOURCE_ENVIRONMENT)
    try:
        # Only a file whose key the client would accept counts as set.
        load_api_key({k: v for k, v in env.items() if k != ENV_API_KEY})
    except StructureError:
        return KeyStatus(set=False, source=None)
    return KeyStatus(set=True, source=SOURCE_KEY_FILE)


def _check_key_text(value: object) -> str:
    """Return the key as it will be stored (blanks around it removed), or raise KeyRefusedError saying why."""
    if not isinstance(value, str):
        raise KeyRefusedError("The API key must be text.")
    key = value.strip()
    if not key:
        raise KeyRefusedError("The API key is blank; paste the key from your aithriving.com account.")
    if len(key) > MAX_KEY_CHARS:
        raise KeyRefusedError(
            f"The API key is {len(key)} characters long, far longer than a key; paste only the key."
        )
    for position, ch in enumerate(key, start=1):
        # The character is named by code only: never echo any part of what was pasted.
        if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            raise KeyRefusedError(
                f"The API key contains a control character (U+{ord(ch):04X}); paste it again on one line."
            )
        if not " " <= ch <= "~":
            # A key is plain ASCII (it goes in an HTTP header); an invisible character pasted along
            # (zero-width space, byte-order mark, no-break space) or a letter such as é cannot be sent.
            raise KeyRefusedError(
                f"The API key has a character that is not plain ASCII text at position {position} "
                f"(U+{ord(ch):04X}{_name_of(ch)}); copy the key again from your aithriving.com account."
            )
    return key


def _name_of(ch: str) -> str:
    """', ZERO WIDTH SPACE' for an invisible or space character (the one a user cannot see), else ''."""
    if unicodedata.category(ch) in ("Cf", "Zs", "Mn", "Me"):
        return f", {unicodedata.name(ch, 'an invisible character').lower()}"
    return ""


def _refuse_if_environment_wins(env: Mapping[str, str], doing: str) -> None:
    if env.get(ENV_API_KEY, "").strip():
        raise KeyFromEnvironmentError(
            f"The {ENV_API_KEY} environment variable is set and takes precedence over the key file, so "
            f"{doing} would change nothing; unset it (and restart ComfyUI) to manage the key here."
        )


def _refuse_if_inside(path: Path, forbidden_dirs: Iterable[os.PathLike]) -> None:
    resolved = path.expanduser().resolve()
    for folder in forbidden_dirs:
        folder_path = Path(folder).expanduser().resolve()
        if resolved == folder_path or folder_path in resolved.parents:
            raise KeyFileLocationError(
                f"The key file {path} would be inside {folder_path}, which ComfyUI serves over HTTP; "
                f"point {ENV_API_KEY_FILE} at a file in your own config folder instead."
            )


def _private_folder(folder: Path, *, own: bool) -> None:
    """Create the folder as 0700; tighten it to 0700 too when it is the pack's own folder.

    Never through a symbolic link: a linked folder is someone's deliberate choice (a shared or synced
    folder, its own mode), and chmod would change the target's mode, not the link's. These are POSIX
    modes: on Windows the user folder's access list is what protects it.
    """
    existed = folder.is_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (not existed or own) and not folder.is_symlink():
        os.chmod(folder, 0o700)


def _is_default_folder(path: Path) -> bool:
    return path.parent in (Path(DEFAULT_KEY_FILE).expanduser().parent, platform_config_folder())


def _write_private(path: Path, text: str) -> None:
    """Write atomically, 0600 from its first byte on POSIX (never world-readable, not even for a moment)."""
    write_atomically(path, text.encode("utf-8"), private=True)


def save_api_key(
    value: object, environ: Mapping[str, str] | None = None, *, forbidden_dirs: Iterable[os.PathLike] = ()
) -> KeyStatus:
    """Check the key, then write it to the key file (0600, folder 0700); nothing is written if refused."""
    env = _env(environ)
    key = _check_key_text(value)
    _refuse_if_environment_wins(env, "saving a key file")
    path = key_file_path(env)
    _refuse_if_inside(path, forbidden_dirs)
    try:
        _private_folder(path.parent, own=_is_default_folder(path))
        _write_private(path, key + "\n")
    except OSError as exc:
        # The exception text names the path only; the key is not in it.
        raise ConfigurationError(
            f"The API key file {path} could not be written ({type(exc).__name__}); check the folder's "
            "permissions."
        ) from None
    log.info("API key saved to %s", path)
    return key_status(env)


def delete_api_key(environ: Mapping[str, str] | None = None) -> KeyStatus:
    """Remove the key file (nothing to do when there is none)."""
    env = _env(environ)
    _refuse_if_environment_wins(env, "removing the key file")
    path = key_file_path(env)
    try:
        path.unlink()
        log.info("API key file %s removed", path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigurationError(
            f"The API key file {path} could not be removed ({type(exc).__name__}); check the folder's "
            "permissions."
        ) from None
    return key_status(env)


# --- offline mode ---------------------------------------------------------------------


def settings_file_path(environ: Mapping[str, str] | None = None) -> Path:
    """Return the pack's settings file, next to the key file."""
    return key_file_path(environ).with_name(SETTINGS_FILE_NAME)


def _read_settings(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning(
            "the settings file %s could not be read (%s); using the defaults", path, type(exc).__name__
        )
        return {}
    return data if isinstance(data, dict) else {}


def offline_mode(environ: Mapping[str, str] | None = None) -> bool:
    """Tell whether offline mode is on (the node runs against the free in-process stand-in)."""
    data = _read_settings(settings_file_path(environ))
    # "local" is the key's old spelling: a settings file written with it still counts, for one release.
    return data.get("offline", data.get("local")) is True


def set_offline_mode(offline: object, environ: Mapping[str, str] | None = None) -> bool:
    """Switch the offline mode on or off, kept in the settings file so it survives a restart."""
    if not isinstance(offline, bool):
        raise ConfigurationError("offline must be true or false.")
    env = _env(environ)
    path = settings_file_path(env)
    data = _read_settings(path)
    data.pop("local", None)
    data["offline"] = offline
    try:
        _private_folder(path.parent, own=_is_default_folder(key_file_path(env)))
        _write_private(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise ConfigurationError(
            f"The settings file {path} could not be written ({type(exc).__name__}); check the folder's "
            "permissions."
        ) from None
    log.info("offline mode %s", "on" if offline else "off")
    return offline
