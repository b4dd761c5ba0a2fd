from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FLOAT32: _ClassVar[Encoding]
    ENCODING_FLOAT16: _ClassVar[Encoding]

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_FRESH: _ClassVar[Status]
    STATUS_STALE: _ClassVar[Status]
    STATUS_COLD_START: _ClassVar[Status]
    STATUS_NOT_FOUND: _ClassVar[Status]
    STATUS_VERSION_MISMATCH: _ClassVar[Status]

class ColdStartStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLD_START_UNSPECIFIED: _ClassVar[ColdStartStatus]
    COLD_START_AVAILABLE: _ClassVar[ColdStartStatus]
    COLD_START_UNAVAILABLE: _ClassVar[ColdStartStatus]
    COLD_START_DISABLED: _ClassVar[ColdStartStatus]
ENCODING_UNSPECIFIED: Encoding
ENCODING_FLOAT32: Encoding
ENCODING_FLOAT16: Encoding
STATUS_UNSPECIFIED: Status
STATUS_FRESH: Status
STATUS_STALE: Status
STATUS_COLD_START: Status
STATUS_NOT_FOUND: Status
STATUS_VERSION_MISMATCH: Status
COLD_START_UNSPECIFIED: ColdStartStatus
COLD_START_AVAILABLE: ColdStartStatus
COLD_START_UNAVAILABLE: ColdStartStatus
COLD_START_DISABLED: ColdStartStatus

class GetEmbeddingRequest(_message.Message):
    __slots__ = ("user_id", "encoding", "model_version", "model")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    encoding: Encoding
    model_version: str
    model: str
    def __init__(self, user_id: _Optional[str] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., model_version: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class BatchGetEmbeddingsRequest(_message.Message):
    __slots__ = ("user_ids", "encoding", "model_version", "models", "model_versions")
    class ModelVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    encoding: Encoding
    model_version: str
    models: _containers.RepeatedScalarFieldContainer[str]
    model_versions: _containers.ScalarMap[str, str]
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., model_version: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., model_versions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("user_id", "status", "vector", "encoding", "dim", "model_version", "space_version", "computed_at", "feature_version", "staleness_ms", "model")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPACE_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_AT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    status: Status
    vector: bytes
    encoding: Encoding
    dim: int
    model_version: str
    space_version: str
    computed_at: int
    feature_version: int
    staleness_ms: int
    model: str
    def __init__(self, user_id: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., vector: _Optional[bytes] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., dim: _Optional[int] = ..., model_version: _Optional[str] = ..., space_version: _Optional[str] = ..., computed_at: _Optional[int] = ..., feature_version: _Optional[int] = ..., staleness_ms: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class BatchGetEmbeddingsResponse(_message.Message):
    __slots__ = ("embeddings",)
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "space_version", "dim", "dtype", "input_schema_hash", "cold_start")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SPACE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCHEMA_HASH_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    space_version: str
    dim: int
    dtype: str
    input_schema_hash: str
    cold_start: ColdStartStatus
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., space_version: _Optional[str] = ..., dim: _Optional[int] = ..., dtype: _Optional[str] = ..., input_schema_hash: _Optional[str] = ..., cold_start: _Optional[_Union[ColdStartStatus, str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
