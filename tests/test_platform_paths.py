"""Where the key file, the settings and the result store live on Windows, macOS and Linux, and that the
old place (~/.config, ~/.cache, used by earlier versions on every platform) keeps being read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from structure_api.config import ENV_API_KEY_FILE, key_file_path, load_api_key
from structure_api.settings import save_api_key, set_offline_mode, settings_file_path
from structure_api.store import ENV_STORE_DIR, default_store_dir

KEY = "sk-platform-paths-key"


@pytest.fixture
def home(monkeypatch, tmp_path) -> Path:
    """A home folder with the variables each platform reads; no key file and no cache folder named."""
    home = tmp_path / "home"
    home.mkdir()
    for name, value in (
        ("HOME", home),
        ("USERPROFILE", home),
        ("APPDATA", home / "AppData" / "Roaming"),
        ("LOCALAPPDATA", home / "AppData" / "Local"),
    ):
        monkeypatch.setenv(name, str(value))
    for name in (ENV_API_KEY_FILE, ENV_STORE_DIR, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.mark.parametrize(
    "platform, config, cache",
    [
        ("win32", ("AppData", "Roaming", "aithriving"), ("AppData", "Local", "aithriving", "structure")),
        (
            "darwin",
            ("Library", "Application Support", "aithriving"),
            ("Library", "Caches", "aithriving", "structure"),
        ),
        ("linux", (".config", "aithriving"), (".cache", "aithriving", "structure")),
    ],
)
def test_each_platform_has_its_own_folders(monkeypatch, home, platform, config, cache):
    monkeypatch.setattr(sys, "platform", platform)
    assert key_file_path() == home.joinpath(*config, "api_key")
    assert settings_file_path() == home.joinpath(*config, "aithriving-settings.json")
    assert default_store_dir() == home.joinpath(*cache)
    # Saved there, read from there.
    save_api_key(KEY)
    set_offline_mode(True)
    assert home.joinpath(*config, "api_key").read_text() == KEY + "\n"
    assert load_api_key().reveal() == KEY


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_the_old_folders_stay_in_use_while_the_new_ones_do_not_exist(monkeypatch, home, platform):
    monkeypatch.setattr(sys, "platform", platform)
    legacy_config, legacy_cache = (
        home / ".config" / "aithriving",
        home / ".cache" / "aithriving" / "structure",
    )
    legacy_config.mkdir(parents=True)
    (legacy_config / "api_key").write_text(KEY + "\n")
    legacy_cache.mkdir(parents=True)
    assert key_file_path() == legacy_config / "api_key"
    assert load_api_key().reveal() == KEY
    assert settings_file_path().parent == legacy_config
    assert default_store_dir() == legacy_cache


def test_xdg_cache_home_and_the_named_key_file_win_everywhere(monkeypatch, home):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    monkeypatch.setenv(ENV_API_KEY_FILE, str(home / "elsewhere" / "key.txt"))
    assert default_store_dir() == home / "xdg" / "aithriving" / "structure"
    assert key_file_path() == home / "elsewhere" / "key.txt"
