"""The HloProtos of a profile's ``/host:metadata`` plane, read with a small declared subset of
XLA's ``hlo.proto`` / ``xla_data.proto`` (module, computations, instructions with name, opcode,
shape and metadata). Field numbers are XLA's; fields not declared here are skipped on read.

For HLO text, give the raw bytes (:attr:`HloModule.proto`) to
``xla_client.HloModule.from_serialized_hlo_module_proto`` (not a dependency of tpusim).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from tpusim.errors import TpusimError
from tpusim.analysis.profiles._messages import message_classes

SCHEMA = {
    "HloProto": [("hlo_module", 1, "HloModuleProto")],
    "HloModuleProto": [("name", 1, "string"), ("entry_computation_name", 2, "string"),
                       ("computations", 3, "HloComputationProto*"), ("id", 5, "int64"),
                       ("entry_computation_id", 6, "int64")],
    "HloComputationProto": [("name", 1, "string"), ("instructions", 2, "HloInstructionProto*"),
                            ("id", 5, "int64"), ("root_id", 6, "int64")],
    "HloInstructionProto": [("name", 1, "string"), ("opcode", 2, "string"), ("shape", 3, "ShapeProto"),
                            ("metadata", 7, "OpMetadata"), ("fusion_kind", 11, "string"),
                            ("channel_id", 26, "int64"), ("id", 35, "int64"), ("operand_ids", 36, "int64*"),
                            ("called_computation_ids", 38, "int64*")],
    # element_type is the PrimitiveType enum; read as int32 (the same varint on the wire).
    "ShapeProto": [("element_type", 2, "int32"), ("dimensions", 3, "int64*"), ("tuple_shapes", 4, "ShapeProto*")],
    "OpMetadata": [("op_type", 1, "string"), ("op_name", 2, "string"), ("source_file", 3, "string"),
                   ("source_line", 4, "int32")],
}
HloProto = message_classes("tpusim.compiler.hlo", SCHEMA)["HloProto"]

# xla_data.proto PrimitiveType numbers -> HLO text names.
DTYPES = {1: "pred", 2: "s8", 3: "s16", 4: "s32", 5: "s64", 6: "u8", 7: "u16", 8: "u32", 9: "u64", 10: "f16",
          11: "f32", 12: "f64", 14: "opaque", 15: "c64", 16: "bf16", 17: "token", 18: "c128", 19: "f8e5m2",
          20: "f8e4m3fn", 21: "s4", 22: "u4", 23: "f8e4m3b11fnuz", 24: "f8e5m2fnuz", 25: "f8e4m3fnuz"}
_TUPLE = 13


@dataclass(frozen=True, slots=True, kw_only=True)
class HloInstruction:
    """One HLO instruction: ``shape`` as HLO text writes it without layout (``f32[5,1024]``,
    ``(f32[2], u32[])``), ``op_name`` the JAX name scope from its metadata."""

    computation: str
    name: str
    opcode: str
    shape: str
    op_name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class HloModule:
    """A compiled module from the profile: name, program id, entry computation, its instructions
    (all computations, in proto order) and the serialized HloProto."""

    name: str
    program_id: int | None
    entry: str
    instructions: tuple[HloInstruction, ...]
    proto: bytes = field(repr=False)

    def instruction(self, name: str) -> HloInstruction:
        """The instruction called ``name`` (KeyError if none)."""
        for ins in self.instructions:
            if ins.name == name:
                return ins
        raise KeyError(name)


def shape_text(shape) -> str:
    """A ShapeProto as HLO text, without layout: ``f32[5,1024,1024,256]``, ``(f32[8], u32[])``."""
    if shape.element_type == _TUPLE:
        return "(" + ", ".join(shape_text(s) for s in shape.tuple_shapes) + ")"
    dtype = DTYPES.get(shape.element_type, f"type{shape.element_type}")
    return f"{dtype}[{','.join(str(d) for d in shape.dimensions)}]"


def parse_hlo_module(key: str, data: bytes, *, program_id: int | None = None, source: str) -> HloModule:
    """An :class:`HloModule` from a serialized HloProto (the ``Hlo Proto`` stat of ``key``)."""
    try:
        module = HloProto.FromString(data).hlo_module
    except DecodeError:
        raise TpusimError(f"the HloProto of module {key!r} is corrupt", source=source) from None
    m = re.match(r"^.*\((\d+)\)$", key)  # "jit_f(12190760917235803885)"
    if program_id is None and m:
        program_id = int(m[1])
    instructions = tuple(
        HloInstruction(computation=c.name, name=i.name, opcode=i.opcode, shape=shape_text(i.shape),
                       op_name=i.metadata.op_name)
        for c in module.computations for i in c.instructions)
    return HloModule(name=module.name, program_id=program_id, entry=module.entry_computation_name,
                     instructions=instructions, proto=data)
