from bkdbg.buildkit_proto import ops_pb2 as _ops_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRecord(_message.Message):
    __slots__ = ("ID", "Labels", "platforms", "GCPolicy", "BuildkitVersion", "CDIDevices")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    GCPOLICY_FIELD_NUMBER: _ClassVar[int]
    BUILDKITVERSION_FIELD_NUMBER: _ClassVar[int]
    CDIDEVICES_FIELD_NUMBER: _ClassVar[int]
    ID: str
    Labels: _containers.ScalarMap[str, str]
    platforms: _containers.RepeatedCompositeFieldContainer[_ops_pb2.Platform]
    GCPolicy: _containers.RepeatedCompositeFieldContainer[GCPolicy]
    BuildkitVersion: BuildkitVersion
    CDIDevices: _containers.RepeatedCompositeFieldContainer[CDIDevice]
    def __init__(self, ID: _Optional[str] = ..., Labels: _Optional[_Mapping[str, str]] = ..., platforms: _Optional[_Iterable[_Union[_ops_pb2.Platform, _Mapping]]] = ..., GCPolicy: _Optional[_Iterable[_Union[GCPolicy, _Mapping]]] = ..., BuildkitVersion: _Optional[_Union[BuildkitVersion, _Mapping]] = ..., CDIDevices: _Optional[_Iterable[_Union[CDIDevice, _Mapping]]] = ...) -> None: ...

class GCPolicy(_message.Message):
    __slots__ = ("all", "keepDuration", "reservedSpace", "filters", "maxUsedSpace", "minFreeSpace")
    ALL_FIELD_NUMBER: _ClassVar[int]
    KEEPDURATION_FIELD_NUMBER: _ClassVar[int]
    RESERVEDSPACE_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    MAXUSEDSPACE_FIELD_NUMBER: _ClassVar[int]
    MINFREESPACE_FIELD_NUMBER: _ClassVar[int]
    all: bool
    keepDuration: int
    reservedSpace: int
    filters: _containers.RepeatedScalarFieldContainer[str]
    maxUsedSpace: int
    minFreeSpace: int
    def __init__(self, all: _Optional[bool] = ..., keepDuration: _Optional[int] = ..., reservedSpace: _Optional[int] = ..., filters: _Optional[_Iterable[str]] = ..., maxUsedSpace: _Optional[int] = ..., minFreeSpace: _Optional[int] = ...) -> None: ...

class BuildkitVersion(_message.Message):
    __slots__ = ("package", "version", "revision", "dockerfileVersion")
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DOCKERFILEVERSION_FIELD_NUMBER: _ClassVar[int]
    package: str
    version: str
    revision: str
    dockerfileVersion: str
    def __init__(self, package: _Optional[str] = ..., version: _Optional[str] = ..., revision: _Optional[str] = ..., dockerfileVersion: _Optional[str] = ...) -> None: ...

class CDIDevice(_message.Message):
    __slots__ = ("Name", "AutoAllow", "Annotations", "OnDemand")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    AUTOALLOW_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    ONDEMAND_FIELD_NUMBER: _ClassVar[int]
    Name: str
    AutoAllow: bool
    Annotations: _containers.ScalarMap[str, str]
    OnDemand: bool
    def __init__(self, Name: _Optional[str] = ..., AutoAllow: _Optional[bool] = ..., Annotations: _Optional[_Mapping[str, str]] = ..., OnDemand: _Optional[bool] = ...) -> None: ...
