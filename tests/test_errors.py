"""The domain error tree maps to HTTP in one table: each book error takes its kind's status."""
import asyncio
import json

from neuranet import errors
from neuranet.server.edge import domain_error, http_status
from neuranet.server.file_records import FileRecordError, UnknownFile
from neuranet.server.files import ChunkGone, FileError, FileTimedOut, FileUnavailable, StorageFull, _ConnectionLost
from neuranet.server.identity_records import StoreError, UnknownRecord
from neuranet.server.runs import RunError
from neuranet.server.serving import ServeConflict, ServeInvalid, ServeTooLarge, ServeUnavailable
from neuranet.server.store import TraceExists


def test_each_book_error_has_its_kinds_status() -> None:
    cases = {RunError("x"): 422, StoreError("x"): 409, UnknownRecord("x"): 404, TraceExists("x"): 409,
             FileRecordError("x"): 409, UnknownFile("x"): 404, FileError("x"): 400, FileUnavailable("x"): 503,
             _ConnectionLost("x"): 503, FileTimedOut("x"): 504, ChunkGone("x"): 410, StorageFull("x"): 507,
             ServeInvalid("x"): 422, ServeConflict("x"): 409, ServeTooLarge("x"): 413, ServeUnavailable("x"): 503,
             errors.Unauthorized("x"): 401, errors.Forbidden("x"): 403}
    assert {type(e).__name__: http_status(e) for e in cases} == {type(e).__name__: s for e, s in cases.items()}


def test_the_handler_answers_detail_with_the_message() -> None:
    response = asyncio.run(domain_error(None, UnknownFile("no file named 'a'")))  # type: ignore[arg-type]
    assert response.status_code == 404 and json.loads(response.body) == {"detail": "no file named 'a'"}
