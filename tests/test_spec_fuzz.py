"""Fuzzing the spec loader: whatever a spec holds, `parse_spec` returns a spec or raises `SpecError` naming a key —
never another exception from deep inside (a TypeError, a KeyError), and never a traceback from inside Ray."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_spec import DEMO

from autoprune.errors import SpecError
from autoprune.space.load import parse_spec

# What YAML can produce: scalars, lists and mappings of them.
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    """Every key path of the nested mappings and lists (leaves, list items and sections alike)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


DEMO_PATHS = sorted(_paths(DEMO), key=str)


def _set(raw: dict, path: tuple, value) -> None:
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _delete(raw: dict, path: tuple) -> None:
    node = raw
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


mutations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(DEMO_PATHS), yaml_values),
        st.tuples(st.just("delete"), st.sampled_from(DEMO_PATHS), st.none()),
        st.tuples(st.just("add"), st.sampled_from([()] + DEMO_PATHS), st.tuples(st.text(max_size=8), yaml_values)),
    ),
    min_size=1, max_size=3,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations)
def test_any_mutation_of_a_valid_spec_parses_or_names_its_key(changes):
    raw = copy.deepcopy(DEMO)
    for kind, path, value in changes:
        try:
            if kind == "set":
                _set(raw, path, value)
            elif kind == "delete":
                _delete(raw, path)
            else:
                key, new = value
                node = raw
                for part in path:
                    node = node[part]
                if isinstance(node, dict):
                    node[key] = new
        except (KeyError, IndexError, TypeError):  # an earlier change removed or replaced the path: skip it
            continue
    try:
        parse_spec(raw, origin="fuzz.yaml")
    except SpecError as error:
        assert str(error).startswith("fuzz.yaml"), str(error)


@settings(max_examples=100, deadline=None)
@given(yaml_values)
def test_any_document_parses_or_is_a_spec_error(document):
    try:
        parse_spec(document, origin="fuzz.yaml")
    except SpecError:
        pass
