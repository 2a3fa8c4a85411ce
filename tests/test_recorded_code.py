"""Recorded code: a reducer of ``__main__`` (a script, a profile, the prompt) is recorded by
its own source, what its globals are bound to and a hash; loading it checks the hash and
runs that definition alone, never the rest of the file it came from.

The "scripts" here are real files run as module ``__main__`` would be (``runpy``), whose
top level appends to a marker file: the marker shows what ran, and when.
"""

from __future__ import annotations

import json
import runpy
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _helpers import PARENT_UID

from bluesky_analysis_store import ProvenanceError, Reducer, code_record, make_provenance
from bluesky_analysis_store._recorded_code import (
    MAX_RECORDED_CHARS,
    load_definition_from_file,
    load_recorded_code,
    source_sha256,
)

SCRIPT = textwrap.dedent(
    '''
    import math
    from math import sqrt

    import numpy as np

    from bluesky_analysis_store import Reducer

    with open(MARKS, "a") as marks:
        marks.write("top level ran\\n")

    GAIN = 2.5
    LABELS = ("a", "b")
    OPENED = open(MARKS)  # a global no record can hold
    OPENED.close()


    def _scaled(value):
        return GAIN * sqrt(value)


    def scaled_total(data, offset=math.pi):
        """Uses a helper of the same file, a constant, imports and a default."""
        return {"total": _scaled(float(np.asarray(data["x"]).sum())) + offset}


    class Tally(Reducer):
        labels = LABELS

        def event(self, stream, data, doc):
            return {"n": len(self.labels) * _scaled(data["x"])}


    def reads_a_file(data):
        return {"closed": OPENED.closed}
    '''
)


def run_as_main(tmp_path: Path, source: str = SCRIPT) -> tuple[dict[str, Any], Path, Path]:
    """Run ``source`` as a script (module ``__main__``); its globals, its file and marker."""
    script, marks = tmp_path / "session.py", tmp_path / "marks.txt"
    script.write_text(source)
    namespace = runpy.run_path(str(script), init_globals={"MARKS": str(marks)}, run_name="__main__")
    return namespace, script, marks


def test_a_script_function_is_recorded_with_what_it_needs_and_loaded_alone(tmp_path):
    namespace, script, marks = run_as_main(tmp_path)
    assert marks.read_text() == "top level ran\n"
    record = code_record(namespace["scaled_total"])
    assert record["name"] == "__main__:scaled_total"
    recorded = record["recorded_code"]
    assert recorded["imports"] == {"np": "numpy", "sqrt": "math:sqrt", "math": "math"}
    assert recorded["constants"] == {"GAIN": "2.5"}
    assert [d.split("(")[0] for d in recorded["definitions"]] == ["def _scaled", "def scaled_total"]
    assert "top level ran" not in "".join(recorded["definitions"])
    assert record["source_sha256"] == source_sha256(recorded)
    # The file's sha256 is its version; the recorded source is hashed on its own.
    assert record["version"] == "sha256:" + record["sha256"]

    # As the catalog keeps it (JSON), and loaded: the same values, the top level not run.
    stored = json.loads(json.dumps(record))
    loaded = load_recorded_code(stored)
    assert loaded({"x": np.array([4.0, 5.0])}) == namespace["scaled_total"]({"x": [4, 5]})
    assert loaded.__module__ == "__main__" and loaded is not namespace["scaled_total"]
    assert marks.read_text() == "top level ran\n"
    assert make_provenance([PARENT_UID], code=namespace["scaled_total"])[1]["strict"] is True


def test_a_script_reducer_class_is_recorded_and_loaded(tmp_path):
    namespace, _, marks = run_as_main(tmp_path)
    record = code_record(namespace["Tally"])
    assert record["recorded_code"]["constants"] == {"LABELS": "('a', 'b')", "GAIN": "2.5"}
    assert record["recorded_code"]["imports"]["Reducer"].endswith(":Reducer")
    cls = load_recorded_code(json.loads(json.dumps(record)))
    assert issubclass(cls, Reducer) and cls is not namespace["Tally"]
    assert cls().event("primary", {"x": 9.0}, {}) == {"n": 2 * 2.5 * 3.0}
    assert marks.read_text() == "top level ran\n"


def test_a_prompt_class_without_a_source_file_is_found_through_its_methods(tmp_path):
    # IPython keeps a cell in linecache under a pseudo file name; inspect cannot find a
    # class there (Python 3.11), its methods can.
    import linecache

    cell = "class AtPrompt(Reducer):\n    def event(self, stream, data, doc):\n        return {}\n"
    filename = "<ipython-input-7-0123456789ab>"
    linecache.cache[filename] = (len(cell), None, cell.splitlines(True), filename)
    namespace: dict[str, Any] = {"__name__": "__main__", "Reducer": Reducer}
    exec(compile(cell, filename, "exec"), namespace)
    record = code_record(namespace["AtPrompt"])
    assert record["recorded_code"]["definitions"] == [cell]
    assert issubclass(load_recorded_code(record), Reducer)


def test_a_global_no_record_can_hold_makes_the_source_unavailable_and_strict_refuses(tmp_path):
    namespace, _, _ = run_as_main(tmp_path)
    record = code_record(namespace["reads_a_file"])
    assert "recorded_code" not in record
    assert "global 'OPENED'" in record["source_unavailable"]
    with pytest.raises(ProvenanceError, match="defined in __main__.*global 'OPENED'"):
        make_provenance([PARENT_UID], code=namespace["reads_a_file"])
    _, provenance = make_provenance([PARENT_UID], code=namespace["reads_a_file"], strict=False)
    assert "OPENED" in provenance["missing"][0]


def test_lambdas_and_closures_are_still_not_recorded() -> None:
    record = code_record(lambda data: data)
    assert record["importable"] is False and "recorded_code" not in record
    with pytest.raises(ProvenanceError, match="cannot be imported again"):
        make_provenance([PARENT_UID], code=lambda data: data)


def test_source_edited_after_the_definition_ran_is_not_recorded(tmp_path):
    namespace, script, _ = run_as_main(tmp_path)
    script.write_text(SCRIPT.replace("GAIN * sqrt(value)", "GAIN * value"))
    import linecache

    linecache.checkcache(str(script))
    record = code_record(namespace["scaled_total"])
    assert "changed after '_scaled' was defined" in record["source_unavailable"]


def test_recorded_source_is_bounded(tmp_path):
    big = SCRIPT.replace("GAIN = 2.5", f'GAIN = 2.5\nBIG = "{"x" * MAX_RECORDED_CHARS}"').replace(
        "return GAIN * sqrt(value)", "return GAIN * sqrt(value) + len(BIG) * 0"
    )
    namespace, _, _ = run_as_main(tmp_path, big)
    assert "over" in code_record(namespace["scaled_total"])["source_unavailable"]


# --- a record that does not hold what it claims: refused before anything runs -------------

SIDE_EFFECT = (
    'def scaled_total(data, _=open(MARKS, "a").write("definition ran\\n")):\n    return {}\n'
)


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    namespace, _, marks = run_as_main(tmp_path)
    marks.unlink()  # from here on, anything that runs would create it
    return json.loads(json.dumps(code_record(namespace["scaled_total"]))), marks


def test_recorded_code_that_does_not_match_its_hash_is_refused(recorded):
    record, marks = recorded
    record["recorded_code"]["definitions"][-1] = SIDE_EFFECT.replace("MARKS", repr(str(marks)))
    with pytest.raises(ProvenanceError, match="does not match its sha256.*nothing was run"):
        load_recorded_code(record)
    assert not marks.exists()


def test_recorded_code_with_other_statements_is_refused_even_with_a_matching_hash(recorded):
    record, marks = recorded
    statement = f"open({str(marks)!r}, 'a').write('statement ran')\n"
    record["recorded_code"]["definitions"][0] = (
        statement + record["recorded_code"]["definitions"][0]
    )
    record["source_sha256"] = source_sha256(record["recorded_code"])
    with pytest.raises(ProvenanceError, match="other statements than one definition"):
        load_recorded_code(record)
    record["recorded_code"]["definitions"] = [statement]
    record["source_sha256"] = source_sha256(record["recorded_code"])
    with pytest.raises(ProvenanceError, match="other statements|does not define"):
        load_recorded_code(record)
    assert not marks.exists()


def test_recorded_code_must_define_the_recorded_name(recorded):
    record, marks = recorded
    record["name"] = "__main__:_scaled"
    with pytest.raises(ProvenanceError, match="does not define '_scaled'"):
        load_recorded_code(record)


# --- a record made before source was recorded: the file, checked, never run ---------------


def test_a_definition_is_taken_alone_from_a_file_whose_sha256_matches(tmp_path):
    namespace, script, marks = run_as_main(tmp_path)
    record = code_record(namespace["scaled_total"])
    legacy = {k: record[k] for k in ("name", "file", "sha256")}
    marks.unlink()

    loaded = load_definition_from_file(legacy)
    assert loaded({"x": [16.0]}) == namespace["scaled_total"]({"x": [16.0]})
    assert not marks.exists()  # the file's top level never ran

    with pytest.raises(ProvenanceError, match="global 'OPENED' is set by code"):
        load_definition_from_file({**legacy, "name": "__main__:reads_a_file"})

    script.write_text(SCRIPT + "\nprint('appended')\n")
    with pytest.raises(ProvenanceError, match="does not match the sha256.*nothing was run"):
        load_definition_from_file(legacy)
    assert not marks.exists()
