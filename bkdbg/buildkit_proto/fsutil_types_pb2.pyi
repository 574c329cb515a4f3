from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stat(_message.Message):
    __slots__ = ("path", "mode", "uid", "gid", "size", "modTime", "linkname", "devmajor", "devminor", "xattrs")
    class XattrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODTIME_FIELD_NUMBER: _ClassVar[int]
    LINKNAME_FIELD_NUMBER: _ClassVar[int]
    DEVMAJOR_FIELD_NUMBER: _ClassVar[int]
    DEVMINOR_FIELD_NUMBER: _ClassVar[int]
    XATTRS_FIELD_NUMBER: _ClassVar[int]
    path: str
    mode: int
    uid: int
    gid: int
    size: int
    modTime: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: _containers.ScalarMap[str, bytes]
    def __init__(self, path: _Optional[str] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., size: _Optional[int] = ..., modTime: _Optional[int] = ..., linkname: _Optional[str] = ..., devmajor: _Optional[int] = ..., devminor: _Optional[int] = ..., xattrs: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class Packet(_message.Message):
    __slots__ = ("type", "stat", "ID", "data")
    class PacketType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PACKET_STAT: _ClassVar[Packet.PacketType]
        PACKET_REQ: _ClassVar[Packet.PacketType]
        PACKET_DATA: _ClassVar[Packet.PacketType]
        PACKET_FIN: _ClassVar[Packet.PacketType]
        PACKET_ERR: _ClassVar[Packet.PacketType]
    PACKET_STAT: Packet.PacketType
    PACKET_REQ: Packet.PacketType
    PACKET_DATA: Packet.PacketType
    PACKET_FIN: Packet.PacketType
    PACKET_ERR: Packet.PacketType
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STAT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    type: Packet.PacketType
    stat: Stat
    ID: int
    data: bytes
    def __init__(self, type: _Optional[_Union[Packet.PacketType, str]] = ..., stat: _Optional[_Union[Stat, _Mapping]] = ..., ID: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
