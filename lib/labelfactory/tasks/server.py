"""The FastAPI app MONAI Label serves, with labelfactory's errors answered as 4xx.

Start with `monailabel start_server --uvicorn_app labelfactory.tasks.server:app ...` (what
`labelfactory serve` does). MONAI Label itself answers every exception with a 500 and a
traceback in its log; here a bad request gets its status and a message a person can act on,
and the server stays up.
"""

from fastapi import Request
from fastapi.responses import JSONResponse
from monailabel.app import app
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException, MONAILabelError, MONAILabelException

from labelfactory.errors import LabelFactoryError

_STATUS = {MONAILabelError.INVALID_INPUT: 400, MONAILabelError.SERVER_ERROR: 500}


@app.exception_handler(LabelFactoryError)
async def _labelfactory_error(request: Request, exc: LabelFactoryError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"detail": str(exc)})


@app.exception_handler(MONAILabelException)
async def _monailabel_error(request: Request, exc: MONAILabelException) -> JSONResponse:
    if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)):
        status = 404
    else:
        status = _STATUS.get(exc.error, 500)
    return JSONResponse(status_code=status, content={"detail": exc.msg})


__all__ = ["app"]
