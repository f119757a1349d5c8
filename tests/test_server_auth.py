"""With an API key (here from $NANOVLLM_API_KEY), /v1 paths need it; /health and /metrics do not."""

from __future__ import annotations

import openai
import pytest
from _server_fixtures import assert_openai_error, start_server

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def server(checkpoint_factory, tmp_path_factory):
    proc = start_server(
        checkpoint_factory("llama3"), tmp_path_factory.mktemp("auth"),
        env={"NANOVLLM_API_KEY": KEY},
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/nope"])  # fmt: skip
def test_no_key_gets_401(server, path):
    response = server.post(path, {"prompt": "hi"}) if "completions" in path else server.get(path)
    assert assert_openai_error(response, 401)["code"] == "invalid_api_key"


@pytest.mark.parametrize("header", ["Bearer wrong", f"Basic {KEY}", KEY, "Bearer "])
def test_wrong_key_gets_401(server, header):
    response = server.get("/v1/models", headers={"Authorization": header})
    assert_openai_error(response, 401)


def test_the_official_client_with_a_wrong_key_raises_authentication_error(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()


def test_right_key_works(server):
    client = server.client(api_key=KEY)
    response = client.completions.create(model=client.models.list().data[0].id, prompt="hi", max_tokens=2)  # fmt: skip
    assert response.usage.completion_tokens >= 1


@pytest.mark.parametrize("path", ["/health", "/metrics", "/version"])
def test_non_v1_paths_stay_open(server, path):
    assert server.get(path).status_code == 200
