"""The promotion gate: the pure rule, the registry side on a local MLflow store, then a real
MLflow server behind a proxy that fails the registry look-ups the gate depends on."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import httpx
import mlflow
import pytest

from dpoflow.errors import ModelError, ServerError
from dpoflow.models.evaluation import win_rate_from_verdicts
from dpoflow.models.serving import log_generator
from dpoflow.tasks.promote import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    champion_version,
    decide,
    get_version,
    list_versions,
    promote_version,
    rollback,
)
from dpoflow.tasks.register import find_version
from tests.conftest import worker_fixture
from tests.servers import MLFLOW_SERVER_ENV, background, free_port, mlflow_server_command
from tests.test_evaluation import save_tiny_model

MODEL = "gate-test"
EVAL = {
    "judge": "vader",
    "max_new_tokens": 8,
    "temperature": 1.0,
    "top_p": 1.0,
    "batch_size": 32,
    "seed": 0,
}
PROMPTS = [f"review {i}: this movie was" for i in range(24)]


def h2h(wins: int, ties: int, losses: int):
    return win_rate_from_verdicts(["win"] * wins + ["tie"] * ties + ["loss"] * losses)


def test_first_version_is_decided_by_the_reference_check_alone():
    assert decide((0.55, 0.8), None).promote
    refused = decide((0.45, 0.8), None)
    assert not refused.promote and "vs reference" in refused.reason


def test_head_to_head_needs_its_lower_bound_above_one_half():
    # 15 of 24 is a point estimate of 0.625, but its interval reaches below 0.5.
    refused = decide((0.6, 0.9), h2h(15, 0, 9), champion="v1")
    assert not refused.promote
    assert "vs champion v1" in refused.reason and "not above 0.5" in refused.reason
    assert decide((0.6, 0.9), h2h(22, 0, 2), champion="v1").promote


def test_a_weak_candidate_never_reaches_the_head_to_head():
    assert "vs reference" in decide((0.3, 0.6), h2h(24, 0, 0), champion="v1").reason


@pytest.fixture
def registry_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("gate", artifact_location=(tmp_path / "a").as_uri())
    model_dir = save_tiny_model(tmp_path / "policy")

    def register(win_rate_ci: str) -> str:
        with mlflow.start_run(experiment_id=experiment):
            info = log_generator(str(model_dir), chat_template="auto")
        tags = {"win_rate_ci": win_rate_ci, "win_rate": "0.7"}
        version = mlflow.register_model(info.model_uri, MODEL, tags=tags).version
        mlflow.MlflowClient().set_registered_model_alias(MODEL, "candidate", version)
        return str(version)

    yield uri, register
    mlflow.set_tracking_uri(None)


def aliases(uri: str) -> dict[str, list[str]]:
    return {row["version"]: row["aliases"] for row in list_versions(mlflow.MlflowClient(uri))}


def test_a_copy_of_the_champion_stays_candidate(registry_uri, capsys):
    uri, register = registry_uri
    first = register("[0.6, 0.8]")
    outcome = promote_version(uri, MODEL, first, PROMPTS, EVAL)
    assert outcome["promoted"] and outcome["aliases"] == ["candidate", CHAMPION]

    second = register("[0.6, 0.8]")  # the very same policy, registered again
    before = aliases(uri)
    outcome = promote_version(uri, MODEL, second, PROMPTS, EVAL)
    after = aliases(uri)
    reason = mlflow.MlflowClient(uri).get_model_version(MODEL, second).tags["promotion.reason"]
    with capsys.disabled():
        print(f"\naliases before {before}\naliases after  {after}\nreason: {reason}")

    assert not outcome["promoted"]
    assert before == after == {first: [CHAMPION], second: ["candidate"]}
    assert "head-to-head win rate vs champion v1" in reason and "not above 0.5" in reason


def test_force_skips_the_checks_and_unknown_versions_are_named(registry_uri):
    uri, register = registry_uri
    version = register("[0.1, 0.3]")
    assert not promote_version(uri, MODEL, version, PROMPTS, EVAL)["promoted"]
    assert promote_version(uri, MODEL, version, [], EVAL, force=True)["promoted"]
    with pytest.raises(ModelError, match="no version '9'.*dpoflow models"):
        promote_version(uri, MODEL, "9", PROMPTS, EVAL)


def test_rollback_walks_back_through_the_champions_it_replaced(registry_uri):
    uri, register = registry_uri
    first, second, third = (register("[0.6, 0.8]") for _ in range(3))
    for version in (first, second, third):
        promote_version(uri, MODEL, version, [], EVAL, force=True)
    # `candidate` stays on the newest version: the rollback aliases move on their own.
    assert aliases(uri) == {third: ["candidate", CHAMPION], second: [PREVIOUS_CHAMPION], first: []}

    done = rollback(uri, MODEL)
    assert (done["version"], done["rolled_back_from"]) == (second, third)
    assert aliases(uri) == {third: ["candidate"], second: [CHAMPION], first: [PREVIOUS_CHAMPION]}
    reason = mlflow.MlflowClient(uri).get_model_version(MODEL, third).tags["promotion.reason"]
    assert reason == f"was champion; rolled back to v{second} by hand"

    assert rollback(uri, MODEL)["version"] == first
    assert PREVIOUS_CHAMPION not in sum(aliases(uri).values(), [])
    with pytest.raises(ModelError, match="no previous-champion to roll back from: promote"):
        rollback(uri, MODEL)


# ---------------------------------------------------------------- a real server that fails

BY_ALIAS = "GET /api/2.0/mlflow/registered-models/alias"
SEARCH = "GET /api/2.0/mlflow/model-versions/search"
GET_VERSION = "GET /api/2.0/mlflow/model-versions/get"
UPSTREAM_BODY = b"upstream trouble at http://internal-host:5000/secret-path"


class FaultyProxy:
    """A loopback proxy in front of a real MLflow server: it answers `faults[call]` (a status,
    with a plain-text body, as a load balancer or an auth layer would) to the calls named
    there, "METHOD /path", and forwards every other request unchanged."""

    def __init__(self, upstream: str):
        self.upstream, self.faults, self.failed = upstream, {}, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def forward(self):
                call = f"{self.command} {urlsplit(self.path).path}"
                if call in proxy.faults:
                    proxy.failed.append(call)
                    self.answer(proxy.faults[call], UPSTREAM_BODY, "text/plain")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                skip = {"host", "content-length", "connection", "accept-encoding"}
                reply = httpx.request(
                    self.command,
                    proxy.upstream + self.path,
                    content=self.rfile.read(length) if length else None,
                    headers={k: v for k, v in self.headers.items() if k.lower() not in skip},
                    timeout=30,
                )
                kind = reply.headers.get("content-type", "application/json")
                self.answer(reply.status_code, reply.content, kind)

            def answer(self, status: int, body: bytes, kind: str):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = forward

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@worker_fixture
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real `mlflow server` on loopback over SQLite, for this module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = mlflow_server_command(port, f"sqlite:///{root / 'mlflow.db'}", root / "artifacts")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | MLFLOW_SERVER_ENV
    url = f"http://127.0.0.1:{port}"
    with background(cmd, root / "mlflow.log", env, root, f"{url}/health"):
        yield url


@pytest.fixture
def proxy(mlflow_server, monkeypatch) -> Iterator[FaultyProxy]:
    # MLflow's own retries of a 500 would stretch each failing call over many seconds.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    faulty = FaultyProxy(mlflow_server)
    yield faulty
    faulty.close()
    mlflow.set_tracking_uri(None)  # `registry` points MLflow at the proxy: do not leak it


def versions_on(server: str, name: str, intervals: list[str]) -> list[str]:
    """Register `name` on the real server with one version per win-rate interval."""
    real = mlflow.MlflowClient(server)
    real.create_registered_model(name)
    return [
        str(real.create_model_version(name, "s3://nowhere/model", tags={"win_rate_ci": ci}).version)
        for ci in intervals
    ]


def assert_one_clear_sentence(error: ServerError, code: str, proxy: FaultyProxy) -> None:
    message = str(error)
    assert code in message and "run again" in message
    assert "\n" not in message and message.endswith(".") and message.count(": ") == 1
    assert proxy.url not in message and "upstream trouble" not in message  # no dump, no body


@pytest.mark.parametrize(("status", "code"), [(500, "INTERNAL_ERROR"), (403, "PERMISSION_DENIED")])
@pytest.mark.slow  # starting `mlflow server` takes 20-40 s on two busy cores
def test_a_failed_champion_look_up_stops_the_gate_and_keeps_the_champion(
    mlflow_server, proxy, status, code
):
    name = f"gate-champion-{status}"
    first, second = versions_on(mlflow_server, name, ["[0.6, 0.8]", "[0.6, 0.8]"])
    real = mlflow.MlflowClient(mlflow_server)
    real.set_registered_model_alias(name, CHAMPION, first)
    proxy.faults[BY_ALIAS] = status

    with pytest.raises(ServerError) as caught:
        promote_version(proxy.url, name, second, PROMPTS, EVAL)

    assert proxy.failed == [BY_ALIAS]
    assert real.get_model_version_by_alias(name, CHAMPION).version == first  # not moved
    assert not any(
        key.startswith("promotion.") for key in real.get_model_version(name, second).tags
    )
    assert_one_clear_sentence(caught.value, code, proxy)


@pytest.mark.parametrize(("status", "code"), [(500, "INTERNAL_ERROR"), (403, "PERMISSION_DENIED")])
@pytest.mark.slow  # starting `mlflow server` takes 20-40 s on two busy cores
def test_a_failed_version_search_raises_instead_of_registering_a_duplicate(
    mlflow_server, proxy, status, code
):
    name = f"register-search-{status}"
    real = mlflow.MlflowClient(mlflow_server)
    run_id = real.create_run("0").info.run_id  # the DPO run the version was registered from
    real.create_registered_model(name)
    version = str(real.create_model_version(name, "s3://nowhere/model", run_id=run_id).version)
    through_proxy = mlflow.MlflowClient(proxy.url)
    assert find_version(through_proxy, name, run_id).version == version

    proxy.faults[SEARCH] = status
    with pytest.raises(ServerError) as caught:
        find_version(through_proxy, name, run_id)
    assert_one_clear_sentence(caught.value, code, proxy)


@pytest.mark.parametrize(("status", "code"), [(500, "INTERNAL_ERROR"), (403, "PERMISSION_DENIED")])
@pytest.mark.slow  # starting `mlflow server` takes 20-40 s on two busy cores
def test_a_failed_version_look_up_is_a_server_error_not_a_missing_version(
    mlflow_server, proxy, status, code
):
    name = f"gate-get-{status}"
    (version,) = versions_on(mlflow_server, name, ["[0.6, 0.8]"])
    proxy.faults[GET_VERSION] = status
    with pytest.raises(ServerError) as caught:  # retried by the stage; a ModelError is not
        promote_version(proxy.url, name, version, PROMPTS, EVAL)
    assert proxy.failed == [GET_VERSION]
    assert_one_clear_sentence(caught.value, code, proxy)


@pytest.mark.slow  # starting `mlflow server` takes 20-40 s on two busy cores
def test_over_http_only_a_missing_alias_or_version_means_absent(mlflow_server, proxy):
    name = "gate-absent"
    (version,) = versions_on(mlflow_server, name, ["[0.6, 0.8]"])
    through_proxy = mlflow.MlflowClient(proxy.url)
    assert champion_version(through_proxy, name) is None
    assert find_version(through_proxy, name, "no-such-run") is None
    assert find_version(through_proxy, "no-such-model", "r") is None
    with pytest.raises(ModelError, match="no version '9'"):
        get_version(through_proxy, name, "9")

    outcome = promote_version(proxy.url, name, version, PROMPTS, EVAL)
    assert outcome["promoted"] and outcome["reason"].endswith("no champion yet")
    assert champion_version(through_proxy, name) == version
    assert proxy.failed == []
