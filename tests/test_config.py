"""Where the key and address come from, and when the key may not travel."""

from __future__ import annotations

import pickle
import sys

import pytest

from structure_api import StructureClient, config
from structure_api.config import APIKey, check_key_may_travel, load_api_key, resolve_base_url
from structure_api.errors import ConfigurationError, InsecureURLError, MissingAPIKeyError, StructureError
from support import TEST_KEY


def test_key_from_environment_wins_over_file(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    env = {"AITHRIVING_API_KEY": "  from-env  ", "AITHRIVING_API_KEY_FILE": str(key_file)}
    assert load_api_key(env).reveal() == "from-env"


def test_key_from_file_when_env_is_unset(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert load_api_key({"AITHRIVING_API_KEY_FILE": str(key_file)}).reveal() == "from-file"


def test_default_key_file_is_in_the_users_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))  # Windows' home; ~/.config is still read there
    (tmp_path / ".config" / "aithriving").mkdir(parents=True)
    (tmp_path / ".config" / "aithriving" / "api_key").write_text("home-key")
    assert load_api_key({}).reveal() == "home-key"


def test_missing_key_says_how_to_set_it(tmp_path):
    with pytest.raises(MissingAPIKeyError) as info:
        load_api_key({"AITHRIVING_API_KEY_FILE": str(tmp_path / "absent")})
    message = str(info.value)
    # The file it looked in, the one AITHRIVING_API_KEY_FILE names, not the default it did not read.
    assert "AITHRIVING_API_KEY " in message and str(tmp_path / "absent") in message
    assert "~/.config" not in message and message.count(". ") == 0  # one sentence
    with pytest.raises(MissingAPIKeyError) as info:
        load_api_key({"HOME": str(tmp_path)})
    # The default file it looked in: ~/.config on Linux, the platform's own config folder on Windows and
    # macOS.
    default = (
        "~/.config/aithriving/api_key"
        if sys.platform not in ("win32", "darwin")
        else str(config.default_key_file({"HOME": str(tmp_path)}))
    )
    assert default in str(info.value)


def test_empty_key_file_is_named(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("\n")
    with pytest.raises(MissingAPIKeyError, match="is empty"):
        load_api_key({"AITHRIVING_API_KEY_FILE": str(key_file)})


def test_client_without_key_fails_before_any_request(standin):
    with pytest.raises(MissingAPIKeyError):
        StructureClient(base_url=standin.url)
    assert standin.requests == []


def test_key_is_masked_everywhere():
    key = APIKey(TEST_KEY)
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert TEST_KEY not in text
    with pytest.raises(TypeError):
        pickle.dumps(key)
    client = StructureClient(api_key=TEST_KEY, base_url="http://127.0.0.1:9")
    assert TEST_KEY not in repr(client) and TEST_KEY not in repr(vars(client))


@pytest.mark.parametrize("url", ["http://example.com", "http://10.0.0.5:8188", "http://192.168.1.2"])
def test_key_never_goes_over_plain_http_to_another_host(url):
    with pytest.raises(InsecureURLError) as info:
        StructureClient(api_key=TEST_KEY, base_url=url)
    assert TEST_KEY not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://www.aithriving.com",
        "http://127.0.0.1:8000",
        "http://localhost:1",
        "http://[::1]:80",
        "http://127.5.6.7",
    ],
)
def test_https_and_loopback_are_allowed(url):
    check_key_may_travel(url)


def test_base_url_default_env_and_bad_values():
    assert resolve_base_url({}) == "https://www.aithriving.com"
    assert resolve_base_url({"AITHRIVING_BASE_URL": "http://127.0.0.1:5/"}) == "http://127.0.0.1:5"
    for bad in ("ftp://x", "not a url", "https://user:pw@host"):
        with pytest.raises(ConfigurationError):
            resolve_base_url({"AITHRIVING_BASE_URL": bad})


SECRET = "sk-live-0123456789abcdef"


def _error_from_key_file(tmp_path, content: bytes):
    key_file = tmp_path / "api_key"
    key_file.write_bytes(content)
    with pytest.raises(StructureError) as info:
        load_api_key({"AITHRIVING_API_KEY_FILE": str(key_file)})
    error = info.value
    # One sentence naming the file; the key is in none of the error's text, args or repr.
    assert str(key_file) in str(error) and str(error).count(". ") == 0 and str(error).endswith(".")
    for text in (str(error), repr(error), repr(error.args)):
        assert SECRET not in text and "0123456789" not in text
    return error


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\xef\xbb\xbf" + SECRET.encode() + b"\n", "byte-order mark"),
        (("\ufeff" + SECRET + "\n").encode("utf-16-le"), "UTF-16"),
        (("\ufeff" + SECRET + "\n").encode("utf-16-be"), "UTF-16"),
        (SECRET.encode("utf-16-le"), "UTF-16"),
        (("sk-liv\u00e9-0123456789abcdef\n").encode("utf-8"), "not plain ASCII"),
        (("\u201csk-live-0123456789abcdef\u201d\n").encode("utf-8"), "not plain ASCII"),
    ],
)
def test_key_file_in_another_encoding_gets_one_sentence_naming_it(tmp_path, content, words):
    assert words in str(_error_from_key_file(tmp_path, content))


def test_key_is_the_first_line_of_the_key_file(tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_bytes(SECRET.encode() + b"\r\n# saved from the account page on Monday\nsecond line\n")
    assert load_api_key({"AITHRIVING_API_KEY_FILE": str(key_file)}).reveal() == SECRET


def test_key_with_non_ascii_characters_from_the_environment_is_refused_without_showing_it():
    with pytest.raises(ConfigurationError) as info:
        load_api_key({"AITHRIVING_API_KEY": SECRET + "\u00e9"})
    assert "not plain ASCII" in str(info.value) and SECRET not in repr(info.value.args)
