"""Webhook credentials (gpurouter/serve/auth.py): bearer and basic, from inline, environment and file secrets."""

from __future__ import annotations

import base64

import pytest

from gpurouter.cluster.config import ConfigError, Secret, WebhookAuth, load_config
from gpurouter.serve.auth import Authenticator


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_no_credentials_configured_allows_everything():
    auth = Authenticator(WebhookAuth())
    assert not auth.enabled
    assert auth.allows(None) and auth.allows("Bearer whatever")


def test_bearer_token():
    auth = Authenticator(WebhookAuth(bearer_token=Secret(value="s3cret")))
    assert auth.enabled and auth.scheme == "Bearer"
    assert auth.allows("Bearer s3cret")
    assert auth.allows("bearer s3cret")  # the scheme is case-insensitive
    for header in (None, "", "Bearer", "Bearer ", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
        assert not auth.allows(header), header
    assert auth.challenge == 'Bearer realm="gpu-router"'


def test_basic_auth_with_password_from_environment(monkeypatch):
    monkeypatch.setenv("HOOK_PASSWORD", "pa:ss wörd")
    auth = Authenticator(WebhookAuth(username="am", password=Secret(env="HOOK_PASSWORD")))
    assert auth.scheme == "Basic"
    assert auth.allows(basic("am", "pa:ss wörd"))
    assert not auth.allows(basic("am", "pa:ss word"))
    assert not auth.allows(basic("other", "pa:ss wörd"))
    assert not auth.allows("Basic !!!not-base64!!!")
    assert not auth.allows("Basic ä")
    assert not auth.allows("Bearer pa:ss wörd")
    assert auth.challenge.startswith("Basic ")


def test_token_from_file_is_read_once_at_start(tmp_path):
    path = tmp_path / "token"
    path.write_text("from-file\n")
    auth = Authenticator(WebhookAuth(bearer_token=Secret(file=str(path))))
    path.write_text("changed\n")
    assert auth.allows("Bearer from-file")


def test_missing_secret_is_a_config_error_at_start(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_TOKEN"):
        Authenticator(WebhookAuth(bearer_token=Secret(env="NO_SUCH_TOKEN")))
    with pytest.raises(ConfigError, match="cannot read credentials file"):
        Authenticator(WebhookAuth(bearer_token=Secret(file=str(tmp_path / "absent"))))


@pytest.mark.parametrize("header", ["Bearer \ud800", "Bearer s3cret\x00", "Bearer " + "x" * 100_000, "\udcff"])
def test_hostile_headers_are_refused_without_raising(header):
    auth = Authenticator(WebhookAuth(bearer_token=Secret(value="s3cret")))
    assert not auth.allows(header)


def test_an_unset_token_variable_names_the_file_and_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text("nodes: [http://127.0.0.1:1]\nproxy: {auth: {bearer_token_env: NO_SUCH_TOKEN}}\n")
    with pytest.raises(ConfigError) as caught:
        Authenticator(load_config(path).proxy.auth)
    assert str(caught.value) == (
        f"{path}: proxy.auth.bearer_token_env: environment variable NO_SUCH_TOKEN is not set or empty"
    )
