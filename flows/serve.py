"""`dpoflow serve`: serve the version a registry alias points to, and follow the alias.

A thread polls the alias every `poll_seconds`. When it points to another version, that
version is loaded beside the current one, asked to answer a short prompt, and only then
swapped in (`ModelHolder.swap`): requests already running finish on the old version, which
is dropped after the last of them. A version that fails to load or to answer is logged
with the reason and the old one keeps serving; it is tried again after `RETRY_SECONDS`.

The version is loaded as MLflow loads it (`mlflow.pyfunc.load_model`: the model file stored
with it runs here, as under `mlflow models serve`), and `/invocations` is MLflow's own
request handling, so the contract is MLflow's scoring server's. `/v1/chat/completions`
speaks OpenAI's chat completions on top of the same model.

FastAPI is imported at the top: it reads the routes' annotations (`Request`) from the
module's globals.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import tempfile
import threading
import time
from typing import Any

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dpoflow.errors import ModelError
from dpoflow.models import chat_completions
from dpoflow.models.model_holder import ModelHolder, Served
from dpoflow.tasks.promote import alias_version, registry

logger = logging.getLogger("dpoflow.serve")

# A version that failed to load is tried again after this long (an artifact store that was
# down comes back); until then each poll that finds it only keeps the old version serving.
RETRY_SECONDS = 60.0
# What a freshly loaded version must answer before it takes any request.
CHECK_REQUEST = pd.DataFrame({"prompt": ["Hello"], "max_new_tokens": [2], "temperature": [0.0]})
# The longest a swap waits for the old version's requests before it drops it anyway (the
# requests still hold it and finish on it): one stuck request must not stop the following.
DRAIN_SECONDS = 300.0
# One prediction at a time across versions: sampling seeds torch's process-wide RNG, and
# MLflow imports each version's model file as a module of its own, each with its own lock.
PREDICT_LOCK = threading.Lock()


def predict(fn, *args):
    """`fn(*args)` (a model's predict, or MLflow's request handling around it) under the
    process-wide prediction lock."""
    with PREDICT_LOCK:
        return fn(*args)


def load_version(name: str, version: str) -> Served:
    """Load version `version` of `name` as a pyfunc model and check that it answers."""
    import mlflow
    import mlflow.models.model

    started = time.monotonic()
    # The download only has to outlive the load: the weights are in memory after it.
    try:
        with tempfile.TemporaryDirectory(prefix="dpoflow-serve-") as tmp:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version}", dst_path=tmp)
    finally:
        # MLflow keeps the last model a code file set in a module global: without this a
        # version that fails its check below would stay in memory beside the one serving.
        mlflow.models.model.__mlflow_model__ = None
    check_answers(model, name, version)
    elapsed = time.monotonic() - started
    logger.info("loaded %s v%s and checked it answers (%.1fs)", name, version, elapsed)
    return Served(version=version, model=model)


def check_answers(model: Any, name: str, version: str) -> None:
    """A ModelError unless `model` answers a short prompt with one `text` row."""
    answer = predict(model.predict, CHECK_REQUEST)
    if not isinstance(answer, pd.DataFrame) or "text" not in answer.columns or len(answer) != 1:
        raise ModelError(
            f"{name} v{version} answered a test prompt without a `text` answer, so it is not a "
            "dpoflow text generator: register a model the pipeline trained."
        )


class Follower:
    """Polls the alias and swaps in the version it points to."""

    def __init__(self, uri: str, name: str, alias: str, holder: ModelHolder, poll_seconds: float):
        self.uri, self.name, self.alias, self.holder = uri, name, alias, holder
        self.poll_seconds = poll_seconds
        self.failed: dict[str, float] = {}  # version -> when it last failed to load
        self._unset_logged = self._error_logged = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alias-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll_once()

    def poll_once(self) -> None:
        """One look at the alias; a swap when it moved to a version that loads and answers."""
        try:
            version = alias_version(registry(self.uri), self.name, self.alias)
        except Exception as exc:  # the registry is down: keep serving, say so once
            if not self._error_logged:
                logger.warning(
                    "cannot read alias %s of %s (%s); still serving v%s",
                    self.alias,
                    self.name,
                    exc,
                    self.holder.current.version,
                )
            self._error_logged = True
            return
        self._error_logged = False
        if version is None:
            if not self._unset_logged:
                logger.warning(
                    "alias %s of %s is not set; still serving v%s",
                    self.alias,
                    self.name,
                    self.holder.current.version,
                )
            self._unset_logged = True
            return
        self._unset_logged = False
        if version == self.holder.current.version:
            return
        if time.monotonic() - self.failed.get(version, -RETRY_SECONDS) < RETRY_SECONDS:
            return
        self.swap_to(version)

    def swap_to(self, version: str) -> None:
        old_version = self.holder.current.version
        logger.info(
            "alias %s of %s moved to v%s: loading it beside v%s",
            self.alias,
            self.name,
            version,
            old_version,
        )
        started = time.monotonic()
        try:
            new = load_version(self.name, version)
        except Exception as exc:  # any failure of a new version: the old one goes on serving
            self.failed[version] = time.monotonic()
            logger.error(
                "could not load %s v%s (%s: %s); still serving v%s, trying v%s again in %.0fs",
                self.name,
                version,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                old_version,
                version,
                RETRY_SECONDS,
            )
            return
        self.failed.pop(version, None)
        old, finishing = self.holder.swap(new, drain_timeout=DRAIN_SECONDS)
        del old  # the holder no longer has it: the old weights go with the last reference
        gc.collect()
        logger.info(
            "now serving %s v%s (swap %.1fs after the alias was seen); v%s dropped after its "
            "%d in-flight request(s) finished",
            self.name,
            version,
            time.monotonic() - started,
            old_version,
            finishing,
        )


def create_app(holder: ModelHolder, name: str, alias: str) -> FastAPI:
    """The FastAPI app: MLflow's scoring routes plus OpenAI chat completions."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    app = FastAPI(title=f"dpoflow serve {name}@{alias}")

    def health_body() -> dict[str, Any]:
        current = holder.current
        return {
            "status": "ok",
            "model": name,
            "alias": alias,
            "version": current.version,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(current.loaded_at)),
        }

    @app.get("/health")
    @app.get("/ping")
    async def health() -> dict[str, Any]:
        return health_body()

    @app.get("/version")
    async def version() -> Response:
        return Response(content=mlflow.__version__, media_type="application/json")

    @app.post("/invocations")
    async def invoke(request: Request) -> Response:
        data = await request.body()
        content_type = request.headers.get("content-type", "")
        with holder.serving() as served:
            schema = served.model.metadata.get_input_schema()
            try:
                result = await asyncio.to_thread(
                    predict, invocations, data, content_type, served.model, schema
                )
            except MlflowException as exc:
                return Response(
                    content=exc.serialize_as_json(),
                    status_code=exc.get_http_status_code(),
                    media_type="application/json",
                    headers={"X-Model-Version": served.version},
                )
        return Response(
            content=result.response,
            status_code=result.status,
            media_type=result.mimetype,
            headers={"X-Model-Version": served.version},
        )

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        created = int(holder.current.loaded_at)
        entry = {"id": name, "object": "model", "created": created, "owned_by": "dpoflow"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise chat_completions.ChatRequestError("the body must be a JSON object.")
            frame = chat_completions.request_frame(body)
        except ValueError as exc:  # ChatRequestError, or a body that is not JSON
            param = getattr(exc, "param", None)
            return JSONResponse(chat_completions.error_body(str(exc), param), status_code=400)
        with holder.serving() as served:
            try:
                answer = await asyncio.to_thread(predict, served.model.predict, frame)
            except MlflowException as exc:
                status = exc.get_http_status_code()
                return JSONResponse(chat_completions.error_body(exc.message), status_code=status)
            return JSONResponse(
                chat_completions.completion(answer, f"{name}/{served.version}"),
                headers={"X-Model-Version": served.version},
            )

    return app


def serve(uri: str, name: str, alias: str, host: str, port: int, poll_seconds: float) -> None:
    """Serve `name@alias` from the registry at `uri` until interrupted, following the alias."""
    import uvicorn

    version = alias_version(registry(uri), name, alias)
    if version is None:
        raise ModelError(
            f"model '{name}' has no alias '{alias}' in the registry at {uri}: promote a version "
            f"first (`dpoflow promote {name} VERSION`) or name another with --alias."
        )
    holder = ModelHolder(load_version(name, version))
    follower = Follower(uri, name, alias, holder, poll_seconds)
    follower.start()
    logger.info(
        "serving %s v%s (alias %s, checked every %.0fs) on http://%s:%d",
        name,
        version,
        alias,
        poll_seconds,
        host,
        port,
    )
    try:
        uvicorn.run(create_app(holder, name, alias), host=host, port=port, log_level="warning")
    finally:
        follower.stop()
