"""Which HTTP status each error gets, decided once for every route (/api/* and clip-retrieval's).

The query floor raises errors that say what went wrong; this maps them: a body that is not an
image 415, an image over the size limit 413, a media_id the build does not hold, an image the store
does not hold, or a model_version with no published build (or several and none named) 404, no index
to answer from or an object store that gave up 503, any other user error (a malformed field, bad
base64, a bad filter) 422. A request that fails validation, including a JSON number that is NaN or
infinite anywhere in a body, is answered 422 with one line naming the field, never the echo of the
input (which JSON cannot even carry for NaN).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ..errors import NoIndexError, NoObjectError, UnknownModelVersionError, UserError
from ..images import BadImageError, ImageTooLargeError
from ..query.terms import NotIndexedError
from ..store.storage import StoreError

# First match wins: the specific kinds before UserError, their base.
STATUS = {
    BadImageError: 415,
    ImageTooLargeError: 413,
    NotIndexedError: 404,
    NoObjectError: 404,
    UnknownModelVersionError: 404,
    NoIndexError: 503,
    StoreError: 503,
    UserError: 422,
}


class Body(BaseModel):
    """Every JSON body the service reads: a NaN or infinite number is refused (422), whatever the field."""

    model_config = ConfigDict(allow_inf_nan=False)


def status_of(err: UserError) -> int:
    return next(code for kind, code in STATUS.items() if isinstance(err, kind))


def one_line(exc: RequestValidationError) -> str:
    """The first validation error as `field: message` (the body's own name left out)."""
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return "the body is not valid JSON"
    where = ".".join(str(part) for part in error["loc"] if part != "body")
    return f"{where}: {error['msg']}" if where else error["msg"]


def install(app: FastAPI) -> None:
    """Register the handlers: UserError and its kinds by STATUS, validation errors as one line."""

    async def user_error(_request: Request, err: UserError) -> JSONResponse:
        return JSONResponse(status_code=status_of(err), content={"detail": str(err)})

    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": one_line(exc)})

    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(RequestValidationError, invalid)
