"""The service's base error: every error the service raises on purpose derives from `ServiceError`.

A state dir, token file, schedule or dataset set that cannot be used (StateError, ScheduleError,
TokenFileError, VocabularyError), a request the service refuses (MixConflict, NoSuchStage, TooFarAhead),
a body or connection gone wrong (WireError, TransportError), the client's StreamError and the launcher's
ServiceDidNotStart. Each is defined once, in the module that raises it. `python -m service` (and
`python -m trainer`, for a refused stream) print them as one line `error: ...` and exit 2
(`pipeline.errors.report_user_error`).
"""


class ServiceError(Exception):
    """The service, its state or a request to it cannot go on; the message names what and why.

    `http_status` is what the HTTP API answers when a request raises it (app.py maps every ServiceError
    by it, in one handler, so no endpoint can answer one differently)."""

    http_status = 500
