from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FilterValues(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class CandidatesRequest(_message.Message):
    __slots__ = ("user_id", "user_id_int", "query_vector", "k", "filter")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FilterValues
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FilterValues, _Mapping]] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_INT_FIELD_NUMBER: _ClassVar[int]
    QUERY_VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    user_id_int: int
    query_vector: _containers.RepeatedScalarFieldContainer[float]
    k: int
    filter: _containers.MessageMap[str, FilterValues]
    def __init__(self, user_id: _Optional[str] = ..., user_id_int: _Optional[int] = ..., query_vector: _Optional[_Iterable[float]] = ..., k: _Optional[int] = ..., filter: _Optional[_Mapping[str, FilterValues]] = ...) -> None: ...

class CandidatesResponse(_message.Message):
    __slots__ = ("item_ids_int", "item_ids_str", "scores", "model_version", "index_version", "timings_ms", "degraded", "partial", "missing_shards")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITEM_IDS_INT_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_STR_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    item_ids_int: _containers.RepeatedScalarFieldContainer[int]
    item_ids_str: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    index_version: str
    timings_ms: _containers.ScalarMap[str, float]
    degraded: bool
    partial: bool
    missing_shards: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, item_ids_int: _Optional[_Iterable[int]] = ..., item_ids_str: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ..., index_version: _Optional[str] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., degraded: _Optional[bool] = ..., partial: _Optional[bool] = ..., missing_shards: _Optional[_Iterable[int]] = ...) -> None: ...

class EventRequest(_message.Message):
    __slots__ = ("user_id", "user_id_int", "item_id", "item_id_int", "type", "ts")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_INT_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_INT_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    user_id_int: int
    item_id: str
    item_id_int: int
    type: str
    ts: float
    def __init__(self, user_id: _Optional[str] = ..., user_id_int: _Optional[int] = ..., item_id: _Optional[str] = ..., item_id_int: _Optional[int] = ..., type: _Optional[str] = ..., ts: _Optional[float] = ...) -> None: ...

class EventResponse(_message.Message):
    __slots__ = ("user_id", "item_id", "type", "ts")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    type: str
    ts: float
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., type: _Optional[str] = ..., ts: _Optional[float] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: str
    def __init__(self, status: _Optional[str] = ...) -> None: ...

class ReadyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadyResponse(_message.Message):
    __slots__ = ("degraded", "dependencies", "index_version", "model_version", "missing_shards", "body_json")
    class DependenciesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEPENDENCIES_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    BODY_JSON_FIELD_NUMBER: _ClassVar[int]
    degraded: bool
    dependencies: _containers.ScalarMap[str, str]
    index_version: str
    model_version: str
    missing_shards: _containers.RepeatedScalarFieldContainer[int]
    body_json: str
    def __init__(self, degraded: _Optional[bool] = ..., dependencies: _Optional[_Mapping[str, str]] = ..., index_version: _Optional[str] = ..., model_version: _Optional[str] = ..., missing_shards: _Optional[_Iterable[int]] = ..., body_json: _Optional[str] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("outcome", "body_json")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    BODY_JSON_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    body_json: str
    def __init__(self, outcome: _Optional[str] = ..., body_json: _Optional[str] = ...) -> None: ...
