"""Protobuf message classes from a schema written in Python, so no ``protoc`` step and no
xprof / tensorflow dependency: the ``.proto`` subset we need is declared next to its reader.

A schema maps message names to fields ``(name, number, type)`` or ``(name, number, type, oneof)``.
``type`` is a scalar (``int64``, ``uint64``, ``int32``, ``double``, ``string``, ``bytes``), another
message of the schema, ``map<int64,Msg>``; a trailing ``*`` makes the field repeated. Unknown fields
in the input are skipped by protobuf, so a subset of a real schema reads real files.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"int64": _F.TYPE_INT64, "uint64": _F.TYPE_UINT64, "int32": _F.TYPE_INT32,
            "double": _F.TYPE_DOUBLE, "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES}


def _add_field(msg, package: str, name: str, number: int, kind: str) -> None:
    repeated = kind.endswith("*")
    kind = kind.rstrip("*")
    field = msg.field.add(name=name, number=number,
                          label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
        return
    field.type = _F.TYPE_MESSAGE
    if kind.startswith("map<"):
        # A map is a repeated nested "<Name>Entry" message with key = 1, value = 2 and map_entry set:
        # that is exactly what protoc generates, so the wire format is the map's.
        key, value = kind[4:-1].split(",")
        entry = msg.nested_type.add(name="".join(p.title() for p in name.split("_")) + "Entry")
        entry.options.map_entry = True
        _add_field(entry, package, "key", 1, key)
        _add_field(entry, package, "value", 2, value)
        field.label = _F.LABEL_REPEATED
        field.type_name = f".{package}.{msg.name}.{entry.name}"
    else:
        field.type_name = f".{package}.{kind}"


def message_classes(package: str, schema: dict[str, list[tuple]]) -> dict[str, type]:
    """Message classes for ``schema``, built in a private descriptor pool.

    The private pool keeps our declarations from clashing with another library that registers the
    real ``tensorflow.profiler`` or ``xla`` messages in the default pool.

    Examples
    --------
    >>> Point = message_classes("demo", {"Point": [("x", 1, "int64"), ("tags", 2, "string*")]})["Point"]
    >>> Point.FromString(Point(x=3, tags=["a"]).SerializeToString()).x
    3
    """
    fdp = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto3")
    for msg_name, fields in schema.items():
        msg = fdp.message_type.add(name=msg_name)
        oneofs: dict[str, int] = {}
        for name, number, kind, *oneof in fields:
            _add_field(msg, package, name, number, kind)
            if oneof:
                if oneof[0] not in oneofs:
                    oneofs[oneof[0]] = len(oneofs)
                    msg.oneof_decl.add(name=oneof[0])
                msg.field[-1].oneof_index = oneofs[oneof[0]]
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
            for name in schema}
