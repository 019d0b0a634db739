"""ID resolution in the catalog: int IDs are internal indices, str IDs raw ones; unknown values are returned in
order (not raised), so each caller decides what they mean (the service answers a 422 naming the field)."""

from __future__ import annotations

import pytest

from pod.recommender import Catalog


@pytest.fixture
def catalog() -> Catalog:
    return Catalog(
        id2user={1: "U00001", 2: "U00002"},
        id2item={1: "P00001", 2: "P00002", 3: "P00003"},
        item_tokens={1: [11, 1], 2: [12, 1], 3: [13, 1]},
        histories={1: [1, 2]},
    )


def test_users_resolve_from_either_form(catalog):
    assert catalog.resolve_users([1, "U00002"]) == ([1, 2], [])
    assert catalog.resolve_users([3, "U00001", "nobody", 0]) == ([1], [3, "nobody", 0])


def test_items_keep_order_and_list_every_unknown_value(catalog):
    assert catalog.resolve_items(["P00003", 1, 2]) == ([3, 1, 2], [])
    assert catalog.resolve_items([1, 77777, "zz", "1", 77777]) == ([1], [77777, "zz", "1", 77777])
    assert catalog.resolve_items([]) == ([], [])


def test_a_boolean_is_no_id_though_python_counts_it_as_1(catalog):
    assert catalog.resolve_items([True]) == ([], [True])
    assert catalog.resolve_users([True, False]) == ([], [True, False])


def test_items_are_shown_in_the_form_they_were_asked_in(catalog):
    assert catalog.show_item(2, int) == 2
    assert catalog.show_item(2, str) == "P00002"
