"""Hypothesis strategies for any protobuf message, built from its descriptor.

Why hand-written: Hypothesis has no protobuf support of its own, and the two packages that
offered it are unmaintained (hypothesis-protobuf, last released in 2015; hypothesis-pb, in
2019, before protobuf's upb runtime and proto3 `optional`), so neither is something to build
the suite on. What a fuzzer needs is small: every value the wire format allows for each field.

- integers over the full range of their width (negative int64, uint64 max, ...);
- doubles including NaN, ±inf and -0.0 (floats as 32-bit values);
- any Unicode text (empty included) and any bytes: short (up to 48) or long (up to 10,000
  characters: a short piece repeated, so a long value costs no more to draw), the short
  branch weighted three to one;
- enums: a known value or any int32 (proto3 enums are open, so unknown numbers are legal);
- repeated fields: 0 to 4 elements, or up to 60 (a few repeated), weighted the same way;
  nested messages recursively;
- oneofs and proto3 `optional`: one member set, or none.

`overrides` maps a field's full name (`shepherd.common.v1.ChatMessage.role`) to a strategy
for its whole value (the list, for a repeated field), wherever the field occurs: that is how
a test biases generation toward realistic values so cases get past the first validation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

Overrides = Mapping[str, st.SearchStrategy[Any]]
MAX_TEXT = 48
MAX_REPEATED = 4
# Long values are short ones repeated: up to 8 characters 1,250 times, 3 elements 20 times.
LONG_TEXT_TIMES = 1_250
LONG_LIST_TIMES = 20

_INTEGERS = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def scalar_values(field: FieldDescriptor, overrides: Overrides) -> st.SearchStrategy[Any]:
    """Any single value of `field`'s type (one element, for a repeated field)."""
    kind = field.cpp_type
    if kind in _INTEGERS:
        low, high = _INTEGERS[kind]
        return st.integers(low, high)
    if kind == FieldDescriptor.CPPTYPE_DOUBLE:
        return st.floats()
    if kind == FieldDescriptor.CPPTYPE_FLOAT:
        return st.floats(width=32)
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.CPPTYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if kind == FieldDescriptor.CPPTYPE_MESSAGE:
        return messages(field.message_type, overrides)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return _mostly_short(st.binary(max_size=MAX_TEXT), st.binary(min_size=1, max_size=8))
    return _mostly_short(st.text(max_size=MAX_TEXT), st.text(min_size=1, max_size=8))


def _mostly_short(
    short: st.SearchStrategy[Any], piece: st.SearchStrategy[Any]
) -> st.SearchStrategy:
    """`short`, or `piece` repeated up to LONG_TEXT_TIMES, the first branch weighted 3:1."""
    long = st.builds(lambda part, times: part * times, piece, st.integers(2, LONG_TEXT_TIMES))
    return st.one_of(short, short, short, long)


def field_values(field: FieldDescriptor, overrides: Overrides | None = None) -> st.SearchStrategy:
    """Any value of `field` as the message constructor takes it, its override if it has one."""
    overrides = overrides or {}
    if field.full_name in overrides:
        return overrides[field.full_name]
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        raise NotImplementedError(f"{field.full_name}: map fields are not supported")
    element = scalar_values(field, overrides)
    if not field.is_repeated:
        return element
    short = st.lists(element, max_size=MAX_REPEATED)
    long = st.builds(
        lambda items, times: items * times,
        st.lists(element, min_size=1, max_size=3),
        st.integers(2, LONG_LIST_TIMES),
    )
    return st.one_of(short, short, short, long)


def _setting(name: str) -> Callable[[Any], dict[str, Any]]:
    """The constructor arguments that set field `name` to a value."""
    return lambda value: {name: value}


def messages(descriptor: Descriptor, overrides: Overrides | None = None) -> st.SearchStrategy:
    """Any message of type `descriptor`: every field drawn, at most one member of each oneof."""
    overrides = overrides or {}
    build = message_factory.GetMessageClass(descriptor)
    plain: dict[str, st.SearchStrategy[Any]] = {}
    oneofs: dict[str, list[st.SearchStrategy[dict[str, Any]]]] = {}
    for field in descriptor.fields:
        values = field_values(field, overrides)
        if field.containing_oneof is None:
            plain[field.name] = values
        else:
            member = values.map(_setting(field.name))
            oneofs.setdefault(field.containing_oneof.name, []).append(member)
    chosen = [st.one_of(st.just({}), *members) for members in oneofs.values()]

    def construct(parts: tuple[dict[str, Any], ...]) -> Message:
        fields: dict[str, Any] = {}
        for part in parts:
            fields.update(part)
        return build(**fields)

    return st.tuples(st.fixed_dictionaries(plain), *chosen).map(construct)
