"""The swap under requests, in-process: requests finish on the version they started on, the
old version is handed back only after them, and a version that fails to load or to answer
never replaces the one serving."""

from __future__ import annotations

import logging
import threading

import pytest

from dpoflow.errors import ModelError
from dpoflow.flows import serve
from dpoflow.models.model_holder import ModelHolder, Served


def test_a_request_finishes_on_its_version_and_the_swap_waits_for_it():
    holder = ModelHolder(Served("1", model="old"))
    inside, release = threading.Event(), threading.Event()
    seen = []

    def request():
        with holder.serving() as served:
            inside.set()
            release.wait(10)
            seen.append(served.version)

    worker = threading.Thread(target=request)
    worker.start()
    inside.wait(10)
    swapped = []
    swapper = threading.Thread(target=lambda: swapped.append(holder.swap(Served("2", "new"))))
    swapper.start()
    swapper.join(0.5)
    # The swap is made (new requests get v2) but does not hand v1 back under its request.
    assert holder.current.version == "2" and swapper.is_alive() and not swapped
    with holder.serving() as served:
        assert served.version == "2"
    release.set()
    worker.join(10)
    swapper.join(10)
    old, finishing = swapped[0]
    assert seen == ["1"] and old.version == "1" and finishing == 1 and old.in_flight == 0


class Registry:
    """Stands in for the registry look-up: the alias points where the test says."""

    def __init__(self, version):
        self.version = version


@pytest.fixture
def follower(monkeypatch):
    registry = Registry("1")
    monkeypatch.setattr(serve, "registry", lambda uri: None)
    monkeypatch.setattr(serve, "alias_version", lambda c, name, alias: registry.version)
    holder = ModelHolder(Served("1", model="v1"))
    return serve.Follower("sqlite://", "m", "champion", holder, 1.0), registry


def test_a_version_that_fails_to_load_is_logged_and_the_old_one_keeps_serving(
    follower, monkeypatch, caplog
):
    follower, registry = follower
    loads = []

    def load(name, version):
        loads.append(version)
        if version == "2":
            raise OSError("config.json is not valid JSON")
        return Served(version, model=f"v{version}")

    monkeypatch.setattr(serve, "load_version", load)
    registry.version = "2"
    with caplog.at_level(logging.INFO, logger="dpoflow.serve"):
        follower.poll_once()
        follower.poll_once()  # within RETRY_SECONDS: not loaded again
    assert follower.holder.current.version == "1" and loads == ["2"]
    assert "could not load m v2 (OSError: config.json is not valid JSON); still serving v1" in (
        caplog.text
    )
    registry.version = "3"
    follower.poll_once()
    assert follower.holder.current.version == "3" and loads == ["2", "3"]


def test_a_version_that_does_not_answer_with_text_is_refused():
    class Silent:
        def predict(self, frame):
            return None

    with pytest.raises(ModelError, match="m v2 answered a test prompt without a `text` answer"):
        serve.check_answers(Silent(), "m", "2")
