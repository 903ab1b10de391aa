"""towerann's exceptions.

Every error a user can cause is a TowerannError with a message that says what went wrong and
what to do. The CLI prints it as one line and exits with `exit_code`; the HTTP app answers
with `http_status` and a JSON body.
"""


class TowerannError(Exception):
    exit_code = 2
    http_status = 400


class ConfigError(TowerannError):
    """A setting or a flag is wrong."""


class DataError(TowerannError):
    """An input file is missing or malformed; the message names the file and the problem."""


class ArtifactError(TowerannError):
    """A saved artifact (model, vectors, index snapshot) is missing, corrupted or of another version."""

    http_status = 409


class IndexIncompatible(ArtifactError):
    """An index snapshot does not fit the model or vectors it is paired with (model version, dim, metric)."""


class BadRequest(TowerannError):
    http_status = 400


class NotFound(TowerannError):
    http_status = 404


class Unauthorized(TowerannError):
    http_status = 401


class Forbidden(TowerannError):
    http_status = 403


class BackendUnavailable(TowerannError):
    """An optional backend (scann, ray, lancedb, redis) is not installed or cannot be reached."""

    http_status = 503


class ShardsUnavailable(BackendUnavailable):
    """No shard of a sharded index answered: nothing to merge (HTTP 503 naming the missing shards)."""

    def __init__(self, message: str, missing_shards: tuple[int, ...]):
        super().__init__(message)
        self.missing_shards = tuple(missing_shards)
