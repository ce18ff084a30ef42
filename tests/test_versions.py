"""The engine-side version table: fresh identities, and versions kept while requests use them."""

import pytest

from colo import EngineError
from engines.base import AdapterVersion
from engines.versions import VersionTable


def test_fresh_identity_for_every_publish_even_a_repeated_version():
    released = []
    table = VersionTable(release=released.append)
    first = table.add(AdapterVersion("a", 1))
    again = table.add(AdapterVersion("a", 1))  # load_state can rewind to a version number seen before
    assert first.int_id != again.int_id and first.name != again.name
    assert released == [first]


def test_a_version_in_use_is_released_only_when_its_requests_finish():
    released = []
    table = VersionTable(release=released.append)
    v1 = table.add(AdapterVersion("a", 1))
    with table.using([AdapterVersion("a", 1), None]) as held:
        assert held == [v1, None]
        v2 = table.add(AdapterVersion("a", 2))
        assert released == []  # v1 is still being sampled
        assert table.live() == [v2, v1]
    assert released == [v1]
    assert table.live() == [v2]


def test_dropping_an_adapter_releases_its_versions():
    released = []
    table = VersionTable(release=released.append)
    v1 = table.add(AdapterVersion("a", 1))
    table.drop("a")
    assert released == [v1] and table.live() == []


def test_asking_for_an_unpublished_version_is_an_error():
    table = VersionTable(release=lambda p: None)
    table.add(AdapterVersion("a", 2))
    with pytest.raises(EngineError, match="adapter a version 1 is not published"):
        with table.using([AdapterVersion("a", 1)]):
            pass
