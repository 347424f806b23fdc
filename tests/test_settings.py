"""The pack's own settings (key file written from the UI, offline mode) and the free stand-in's mark."""

from __future__ import annotations

import json
import os
import stat

import pytest

from structure_api import StructureClient, StructureRequest, config
from structure_api import standin as standin_module
from structure_api.images import encode_upload
from structure_api.offline import InProcessStandIn, client_for_run
from structure_api.settings import (
    KeyFileLocationError,
    KeyFromEnvironmentError,
    KeyRefusedError,
    delete_api_key,
    key_status,
    offline_mode,
    save_api_key,
    set_offline_mode,
    settings_file_path,
)
from structure_api.standin import StandInServer
from support import TEST_KEY, photo_like


@pytest.fixture
def env(tmp_path):
    return {"AITHRIVING_API_KEY_FILE": str(tmp_path / "conf" / "aithriving" / "api_key")}


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_no_key_anywhere_is_not_set(env):
    assert key_status(env).as_json() == {"set": False, "source": None}


def test_environment_key_is_reported_as_environment(env):
    assert key_status({**env, "AITHRIVING_API_KEY": TEST_KEY}).as_json() == {
        "set": True,
        "source": "environment",
    }


def test_saved_key_is_read_by_the_next_client(env, tmp_path):
    status = save_api_key(f"  {TEST_KEY}\n", env)
    path = tmp_path / "conf" / "aithriving" / "api_key"
    assert status.as_json() == {"set": True, "source": "key file"}
    assert path.read_text() == TEST_KEY + "\n"
    assert config.load_api_key(env).reveal() == TEST_KEY
    assert [p.name for p in path.parent.iterdir()] == ["api_key"]  # no temporary file left behind


def test_saving_again_replaces_the_key(env):
    save_api_key("first-key", env)
    save_api_key(TEST_KEY, env)
    assert config.load_api_key(env).reveal() == TEST_KEY


@pytest.mark.parametrize(
    "value, words",
    [
        ("", "blank"),
        ("   \t ", "blank"),
        ("abc\ndef", "control character (U+000A)"),
        ("abc\x00def", "control character (U+0000)"),
        ("abc\x1bdef", "control character (U+001B)"),
        ("k" * 1001, "1001 characters"),
        (12345, "must be text"),
    ],
)
def test_refused_keys_write_nothing_and_never_echo_the_key(env, tmp_path, value, words):
    with pytest.raises(KeyRefusedError) as caught:
        save_api_key(value, env)
    assert words in str(caught.value)
    if isinstance(value, str) and value.strip():
        assert value.strip()[:4] not in str(caught.value)
    assert not (tmp_path / "conf").exists()


@pytest.mark.parametrize(
    "value, words",
    [
        ("sk-abc\u200bdef", "position 7 (U+200B, zero width space)"),
        ("\ufeffsk-abcdef", "position 1 (U+FEFF, zero width no-break space)"),
        ("sk-abc\u00a0def", "position 7 (U+00A0, no-break space)"),
        ("sk-abcdéf", "position 8 (U+00E9)"),
        ("sk-abc\u2028def", "control character (U+2028)"),
    ],
    ids=["zero-width-space", "bom", "nbsp", "e-acute", "line-separator"],
)
def test_unusable_keys_are_refused_and_the_working_key_stays(env, tmp_path, value, words):
    save_api_key(TEST_KEY, env)
    with pytest.raises(KeyRefusedError) as caught:
        save_api_key(value, env)
    message = str(caught.value)
    assert words in message and "sk-abc" not in message and "\n" not in message, message
    assert config.load_api_key(env).reveal() == TEST_KEY
    assert key_status(env).as_json() == {"set": True, "source": "key file"}


@pytest.mark.posix_only(
    "file modes do not exist on Windows, so there is no target's mode for a linked folder to keep: the "
    "access list of the user's own folder protects the key there"
)
def test_a_symlinked_config_folder_keeps_its_targets_mode(tmp_path):
    shared = tmp_path / "shared-config"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    link = tmp_path / "home" / ".config" / "aithriving"
    link.parent.mkdir(parents=True)
    link.symlink_to(shared, target_is_directory=True)
    env = {"AITHRIVING_API_KEY_FILE": str(link / "api_key")}
    save_api_key(TEST_KEY, env)
    set_offline_mode(True, env)
    assert mode_of(shared) == 0o2775 and link.is_symlink()
    assert mode_of(shared / "api_key") == 0o600 and config.load_api_key(env).reveal() == TEST_KEY


@pytest.mark.posix_only(
    "file modes do not exist on Windows: what keeps others out of the config folder there is the access "
    "list of the user's own folder, under which it lives"
)
def test_the_default_folder_is_still_tightened_when_it_is_no_link(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / ".config" / "aithriving"
    folder.mkdir(parents=True)
    os.chmod(folder, 0o755)
    save_api_key(TEST_KEY, {"AITHRIVING_API_KEY_FILE": str(folder / "api_key")})
    assert mode_of(folder) == 0o700


def test_environment_key_wins_so_saving_and_deleting_are_refused(env, tmp_path):
    with_env = {**env, "AITHRIVING_API_KEY": TEST_KEY}
    with pytest.raises(KeyFromEnvironmentError, match="AITHRIVING_API_KEY environment variable is set"):
        save_api_key("another-key", with_env)
    with pytest.raises(KeyFromEnvironmentError):
        delete_api_key(with_env)
    assert not (tmp_path / "conf").exists()


def test_key_file_inside_a_served_folder_is_refused(tmp_path):
    served = tmp_path / "ComfyUI" / "user"
    env = {"AITHRIVING_API_KEY_FILE": str(served / "default" / "api_key")}
    with pytest.raises(KeyFileLocationError, match="serves over HTTP"):
        save_api_key(TEST_KEY, env, forbidden_dirs=[served])
    assert not served.exists()


def test_delete_removes_the_key_file_and_is_idempotent(env, tmp_path):
    save_api_key(TEST_KEY, env)
    assert delete_api_key(env).as_json() == {"set": False, "source": None}
    assert not (tmp_path / "conf" / "aithriving" / "api_key").exists()
    assert delete_api_key(env).as_json() == {"set": False, "source": None}


def test_empty_key_file_is_not_set(env, tmp_path):
    path = tmp_path / "conf" / "aithriving" / "api_key"
    path.parent.mkdir(parents=True)
    path.write_text("\n")
    assert key_status(env).set is False


def test_offline_mode_is_off_by_default_and_kept_next_to_the_key_file(env, tmp_path):
    assert offline_mode(env) is False
    assert set_offline_mode(True, env) is True
    path = settings_file_path(env)
    assert path == tmp_path / "conf" / "aithriving" / "aithriving-settings.json"
    assert offline_mode(env) is True
    set_offline_mode(False, env)
    assert offline_mode(env) is False


def test_a_settings_file_with_the_old_key_still_counts(env):
    path = settings_file_path(env)
    path.parent.mkdir(parents=True)
    path.write_text('{"local": true}')  # the key's old spelling
    assert offline_mode(env) is True
    set_offline_mode(False, env)
    assert json.loads(path.read_text()) == {"offline": False}
    assert offline_mode(env) is False


@pytest.mark.posix_only(
    "file modes do not exist on Windows: what keeps others out of the key file there is "
    "the access list of the user's own folder, under which it lives"
)
def test_saved_key_and_settings_are_private(env, tmp_path):
    save_api_key(TEST_KEY, env)
    set_offline_mode(True, env)
    path = tmp_path / "conf" / "aithriving" / "api_key"
    assert mode_of(path) == 0o600 and mode_of(path.parent) == 0o700
    assert mode_of(settings_file_path(env)) == 0o600


def test_offline_mode_takes_only_booleans(env):
    with pytest.raises(Exception, match="true or false"):
        set_offline_mode("yes", env)


def test_broken_settings_file_means_defaults(env):
    path = settings_file_path(env)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert offline_mode(env) is False


def test_header_names_agree():
    assert standin_module.STANDIN_HEADER == config.STANDIN_HEADER


def _one_request() -> StructureRequest:
    return StructureRequest(image=encode_upload(photo_like(96, 96)), prompt="a cottage", seed=7)


def test_free_standin_results_cost_nothing_and_billing_standin_results_cost_six():
    with StandInServer(free=True) as free, StandInServer() as billing:
        with StructureClient(api_key="x", base_url=free.url) as client:
            assert client.generate(_one_request()).credits == 0
        with StructureClient(api_key="x", base_url=billing.url) as client:
            assert client.generate(_one_request()).credits == 6


def test_offline_run_needs_no_key_and_skips_the_result_store(env):
    set_offline_mode(True, env)
    standin = InProcessStandIn()
    with client_for_run(standin, env) as run:
        assert run.offline and run.store.directory is None and not run.store.persistent
        assert standin.running
        result = run.client.generate(_one_request())
        assert result.credits == 0 and result.pixels.shape == (96, 96, 3)
    assert standin.running  # kept for the next run while offline mode is on
    standin.release()
    assert not standin.running


def test_release_during_a_run_stops_the_standin_when_the_run_ends(env):
    set_offline_mode(True, env)
    standin = InProcessStandIn()
    with client_for_run(standin, env) as run:
        standin.release()
        assert standin.running
        assert run.client.generate(_one_request()).credits == 0
    assert not standin.running


def test_online_run_needs_the_key(env):
    from structure_api.errors import MissingAPIKeyError

    with pytest.raises(MissingAPIKeyError):
        with client_for_run(InProcessStandIn(), env):
            pass


def test_online_run_reads_a_key_saved_since_the_last_run(env, standin):
    env = {**env, "AITHRIVING_BASE_URL": standin.url, "AITHRIVING_CACHE_DIR": "off"}
    save_api_key(TEST_KEY, env)
    with client_for_run(InProcessStandIn(), env) as run:
        assert not run.offline and run.store.directory is None
        assert run.client.generate(_one_request()).credits == 6
    assert standin.requests[-1].headers["authorization"] == TEST_KEY and standin.requests[-1].status == 200


def test_request_destination_changes_with_the_mode_and_the_address_never_with_the_key(env):
    from structure_api.offline import request_destination

    service = request_destination({**env, "AITHRIVING_API_KEY": TEST_KEY})
    assert service == "https://www.aithriving.com" and TEST_KEY not in service
    other = request_destination({**env, "AITHRIVING_BASE_URL": "http://127.0.0.1:9"})
    assert other == "http://127.0.0.1:9"
    assert request_destination({**env, "AITHRIVING_BASE_URL": "ftp://x"}) not in (service, other)
    set_offline_mode(True, env)
    assert request_destination(env) not in (service, other)
    set_offline_mode(False, env)
    assert request_destination(env) == service


def test_the_destination_fingerprint_names_neither_the_mode_nor_the_address(env):
    from structure_api.offline import destination_fingerprint

    service = destination_fingerprint({**env, "AITHRIVING_BASE_URL": "http://127.0.0.1:9"})
    assert "127.0.0.1" not in service and len(service) == 16
    set_offline_mode(True, env)
    offline = destination_fingerprint(env)
    assert offline != service and "stand-in" not in offline and "local" not in offline
