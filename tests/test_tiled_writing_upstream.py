"""The private members of bluesky-tiled-plugins that ``_tiled_writing.py`` (the only module
using any) relies on. The plugin is pinned below its next minor release; if an update
renames or reshapes one of these, this test fails before a scan does."""

from __future__ import annotations

import inspect

from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer, _RunWriter

RUN_WRITER_METHODS = {
    "_close_stream_tree": ["self"],
    "_write_internal_data": ["self", "data_cache", "desc_node"],
    "_write_external_data": ["self", "doc"],
    "descriptor": ["self", "doc"],
}
RUN_WRITER_ATTRIBUTES = [
    "_internal_data_cache", "_external_data_cache", "_desc_nodes", "data_keys",
]  # fmt: skip


def test_the_run_writers_private_methods_are_there_with_their_signatures():
    for name, parameters in RUN_WRITER_METHODS.items():
        method = getattr(_RunWriter, name)
        assert list(inspect.signature(method).parameters) == parameters, name


def test_the_run_writers_private_caches_are_made_by_its_constructor():
    source = inspect.getsource(_RunWriter.__init__)
    for attribute in RUN_WRITER_ATTRIBUTES:
        assert f"self.{attribute}" in source, attribute


def test_the_normalizers_datum_conversion_is_there_with_its_signature():
    method = RunNormalizer._convert_datum_to_stream_datum
    assert list(inspect.signature(method).parameters) == [
        "self", "datum_doc", "data_key", "desc_uid", "seq_num",
    ]  # fmt: skip
