"""Recorded code: the source of a reducer that cannot be imported again by its name.

A reducer defined at the IPython prompt, in a profile's startup file or in a script lives in
module ``__main__``: another process cannot import it, and re-running the file it came from
would run everything else in it too (opening stores, starting workers, scanning). So when its
code record is made, the definition's own source is saved with the child run, with what its
globals were bound to: modules and importable code by name, literals by value, other
definitions of the same ``__main__`` by their source. The whole is hashed (``source_sha256``).

:func:`load_recorded_code` re-creates the definition, and only the definition, in a fresh
namespace, after checking the hash. Source is recorded rather than a pickle so that a person
can read what would run before trusting it (``bluesky-analysis-store show``); the hash proves
only that the record is whole, not who wrote it, so loading is for runs the user trusts.

A record made before source was recorded names the file instead: :func:`load_definition_from_file`
checks the file's sha256 against the record before reading anything from it, then takes
only the definition, the file's imports and its literal constants, and never runs the rest.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
import inspect
import json
import linecache
import os
import symtable
import types
from collections.abc import Mapping
from typing import Any

from ._errors import ProvenanceError

__all__ = [
    "MAX_RECORDED_CHARS",
    "RECORDED_CODE_FORMAT",
    "load_definition_from_file",
    "load_recorded_code",
    "recorded_code_fields",
    "source_sha256",
]

RECORDED_CODE_FORMAT = "python-source/1"
MAX_RECORDED_CHARS = 64 * 1024
"""The most source (all definitions and constants) one code record may carry."""
MAX_DEFINITIONS = 32

_DEFINITION_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class _UnrecordableError(Exception):
    """Why a definition's source cannot be recorded (kept in the record as a reason)."""


def source_sha256(recorded: Mapping[str, Any]) -> str:
    """The sha256 of a recorded-code mapping in canonical JSON (as the catalog keeps it)."""
    text = json.dumps(recorded, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- recording ------------------------------------------------------------------------------


def recorded_code_fields(target: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    """Fields to add to the code record of ``target``: ``recorded_code`` and ``source_sha256``
    (and a ``version`` if it has none) for a top-level function or class of ``__main__`` or
    of a module that cannot be imported by its name; ``source_unavailable`` with the reason
    when its source cannot be recorded; nothing for other code."""
    module_name, _, qualname = str(record.get("name", "")).partition(":")
    if not (inspect.isfunction(target) or inspect.isclass(target)):
        return {}
    if "<" in qualname:  # a lambda or a closure: its globals alone do not re-create it
        return {}
    if module_name != "__main__" and record.get("importable", True):
        return {}
    try:
        if "." in qualname:
            raise _UnrecordableError("only top-level functions and classes are recorded")
        recorded = _capture(target)
    except _UnrecordableError as why:
        return {"source_unavailable": str(why)}
    digest = source_sha256(recorded)
    fields: dict[str, Any] = {"recorded_code": recorded, "source_sha256": digest}
    if "version" not in record:
        fields["version"] = "source-sha256:" + digest
    return fields


def edited_since_loaded(target: Any) -> str | None:
    """Why the source file of an imported, top-level function no longer holds the code that
    is loaded (the file was edited and the module not reloaded), or None if it does or
    cannot be told (a class, a builtin, no file): its sha256 would then name other code."""
    if not inspect.isfunction(target) or "<" in target.__qualname__ or "." in target.__qualname__:
        return None
    code = target.__code__
    if getattr(code, "co_qualname", code.co_name) != code.co_name:
        return None  # made inside another function (a decorator factory): not top-level
    if not os.path.isfile(code.co_filename):
        return None
    # The whole file is compiled, as its import did: how a call compiles depends on how
    # its names are bound in the module (an imported name's method is loaded differently).
    try:
        with open(code.co_filename, "rb") as file:
            module = compile(file.read(), code.co_filename, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError) as error:
        return f"{code.co_filename} cannot be compiled now ({error})"
    if not any(
        isinstance(const, types.CodeType)
        and const.co_name == code.co_name
        and _same_code(const, code)
        for const in module.co_consts
    ):
        return f"{code.co_filename} changed after {target.__name__!r} was imported"
    return None


def _capture(target: Any) -> dict[str, Any]:
    namespace = _globals_of(target)
    definitions: list[str] = []
    imports: dict[str, str] = {}
    constants: dict[str, str] = {}
    visiting: set[str] = set()

    def visit(obj: Any) -> None:
        # Post-order: what a decorator, a default or a base class needs is defined first.
        visiting.add(obj.__name__)
        if len(visiting) > MAX_DEFINITIONS:
            raise _UnrecordableError(
                f"it needs more than {MAX_DEFINITIONS} definitions of __main__"
            )
        source = _definition_source(obj)
        for name in _global_names(source):
            if name in visiting or name in imports or name in constants:
                continue
            if name not in namespace:
                continue  # a builtin, or unbound (a NameError in the original too)
            value = namespace[name]
            if _is_same_main_definition(value, target, name):
                visit(value)
            else:
                kind, text = _bind(name, value)
                (imports if kind == "import" else constants)[name] = text
        definitions.append(source)

    visit(target)
    recorded = {
        "format": RECORDED_CODE_FORMAT,
        "defines": target.__name__,
        "definitions": definitions,
        "imports": imports,
        "constants": constants,
    }
    size = sum(map(len, definitions)) + sum(map(len, constants.values()))
    if size > MAX_RECORDED_CHARS:
        raise _UnrecordableError(f"its source is {size} characters, over {MAX_RECORDED_CHARS}")
    return recorded


def _globals_of(target: Any) -> Mapping[str, Any]:
    if inspect.isfunction(target):
        return target.__globals__
    code = _code_of_class(target)
    if code is not None:
        return code[1]
    module = inspect.getmodule(target)
    return vars(module) if module is not None else {}


def _code_of_class(cls: type) -> tuple[types.CodeType, Mapping[str, Any]] | None:
    """The code object and globals of one of the class's own methods, which say where the
    class was defined (a class defined at the prompt has no source file of its own)."""
    for value in vars(cls).values():
        func = getattr(value, "__func__", getattr(value, "fget", value))
        if inspect.isfunction(func) and func.__qualname__.startswith(cls.__qualname__ + "."):
            return func.__code__, func.__globals__
    return None


def _is_same_main_definition(value: Any, target: Any, name: str) -> bool:
    return (
        (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == target.__module__
        and getattr(value, "__qualname__", None) == name
    )


def _bind(name: str, value: Any) -> tuple[str, str]:
    """How to bind global ``name`` again: ``("import", "module")``, ``("import",
    "module:qualname")`` or ``("constant", repr)``."""
    from ._provenance import resolve_code_name

    if isinstance(value, types.ModuleType):
        if value.__name__ == "__main__":
            raise _UnrecordableError(f"global {name!r} is the __main__ module itself")
        return "import", value.__name__
    module_name = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    if (
        isinstance(module_name, str)
        and module_name != "__main__"
        and isinstance(qualname, str)
        and "<" not in qualname
    ):
        try:
            if resolve_code_name(f"{module_name}:{qualname}") is value:
                return "import", f"{module_name}:{qualname}"
        except ProvenanceError:
            pass
    try:
        text = repr(value)
        if type(ast.literal_eval(text)) is type(value) and ast.literal_eval(text) == value:
            return "constant", text
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    raise _UnrecordableError(
        f"global {name!r} ({type(value).__name__}) is neither a module, code importable by "
        "name, a definition of __main__ nor a literal: pass it as a parameter instead"
    )


def _definition_source(obj: Any) -> str:
    """The source of ``obj``'s own top-level ``def``/``class`` statement, decorators included."""
    if inspect.isfunction(obj):
        code: types.CodeType | None = obj.__code__
        module_globals: Mapping[str, Any] | None = obj.__globals__
    else:
        found = _code_of_class(obj)
        code, module_globals = found if found else (None, None)
    if code is None:
        try:
            return inspect.getsource(obj)
        except (OSError, TypeError) as error:
            raise _UnrecordableError(f"its source is not available ({error})") from None
    # linecache holds IPython's cells as well as files, and reads files once per session.
    lines = linecache.getlines(code.co_filename, dict(module_globals or {}))
    if not lines:
        raise _UnrecordableError(f"its source ({code.co_filename}) is not available")
    try:
        tree = ast.parse("".join(lines))
    except SyntaxError as error:
        raise _UnrecordableError(f"{code.co_filename} does not parse: {error}") from None
    line = code.co_firstlineno
    statement = None
    for node in tree.body:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        if not isinstance(node, _DEFINITION_NODES) or node.name != obj.__name__:
            continue
        if (inspect.isfunction(obj) and first == line) or (
            inspect.isclass(obj) and first <= line <= (node.end_lineno or first)
        ):
            statement, start = node, first
    if statement is None:
        raise _UnrecordableError(
            f"no definition of {obj.__name__!r} at line {line} of {code.co_filename}"
        )
    source = "".join(lines[start - 1 : statement.end_lineno])
    if inspect.isfunction(obj) and not _compiles_to(source, obj):
        raise _UnrecordableError(f"{code.co_filename} changed after {obj.__name__!r} was defined")
    return source


def _compiles_to(source: str, func: types.FunctionType) -> bool:
    """Whether ``source`` compiles to ``func``'s bytecode: the file was not edited since."""
    # The compiler calls a method of an imported module differently (Python 3.11): the
    # imports the function sees are declared first, compiled, never run.
    imports = "".join(
        f"import {value.__name__} as {name}\n"
        for name, value in func.__globals__.items()
        if isinstance(value, types.ModuleType)
        and name.isidentifier()
        and all(part.isidentifier() for part in value.__name__.split("."))
    )
    flags = func.__code__.co_flags & _FUTURE_FLAGS
    # Recorded code re-created alone was compiled without them: either may be the original.
    for prefix in (imports, ""):
        try:
            module = compile(
                prefix + source, "<definition>", "exec", flags=flags, dont_inherit=True
            )
        except SyntaxError:
            continue
        if any(
            isinstance(const, types.CodeType)
            and const.co_name == func.__code__.co_name
            and _same_code(const, func.__code__)
            for const in module.co_consts
        ):
            return True
    return False


def _same_code(a: types.CodeType, b: types.CodeType) -> bool:
    """Bytecode, names and constants alike (``axis=0`` and ``axis=1`` differ only in a
    constant), nested code objects compared the same way."""
    if (a.co_code, a.co_names, a.co_varnames) != (b.co_code, b.co_names, b.co_varnames):
        return False
    if len(a.co_consts) != len(b.co_consts):
        return False
    for x, y in zip(a.co_consts, b.co_consts, strict=True):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            if not _same_code(x, y):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def _future_flags() -> int:
    import __future__

    return sum(getattr(__future__, name).compiler_flag for name in __future__.all_feature_names)


_FUTURE_FLAGS = _future_flags()


def _global_names(source: str) -> list[str]:
    """The global names a definition uses: in the statement itself (decorators, defaults,
    bases) and in every scope nested in it."""
    table = symtable.symtable(source, "<definition>", "exec")
    names = [s.get_name() for s in table.get_symbols() if s.is_referenced()]

    def walk(scope: symtable.SymbolTable) -> None:
        for child in scope.get_children():
            names.extend(
                s.get_name() for s in child.get_symbols() if s.is_global() and s.is_referenced()
            )
            walk(child)

    walk(table)
    return list(dict.fromkeys(names))


# --- loading --------------------------------------------------------------------------------


def load_recorded_code(record: Mapping[str, Any]) -> Any:
    """The function or class of a code record's ``recorded_code``, re-created in a fresh
    namespace; :class:`ProvenanceError`, before anything runs, when the recorded code does
    not match its ``source_sha256`` or is anything but definitions."""
    name = str(record.get("name", "?"))
    recorded = record.get("recorded_code")
    if not isinstance(recorded, Mapping):
        raise ProvenanceError(f"{name} has no recorded code")
    digest = source_sha256(recorded)
    if digest != record.get("source_sha256"):
        raise ProvenanceError(
            f"the recorded code of {name} does not match its sha256 "
            f"({str(record.get('source_sha256'))[:12]}… recorded, {digest[:12]}… found): "
            "refused, nothing was run"
        )
    return _build(name, recorded)


def load_definition_from_file(record: Mapping[str, Any]) -> Any:
    """The definition a code record names, taken from the file it names without running
    that file: the file's bytes must match the recorded sha256 (checked before anything is
    read from them); then only the definition, the definitions it uses, the file's imports
    and its literal constants are run."""
    name = str(record.get("name", "?"))
    path, expected = record.get("file"), record.get("sha256")
    if not isinstance(path, str) or not isinstance(expected, str):
        raise ProvenanceError(f"{name} names no file with a sha256 to load it from")
    try:
        with open(path, "rb") as file:
            content = file.read()  # hashed and parsed from the same bytes
    except OSError as error:
        raise ProvenanceError(f"cannot read {path!r} to find {name}: {error}") from error
    if (digest := hashlib.sha256(content).hexdigest()) != expected:
        raise ProvenanceError(
            f"{path} does not match the sha256 recorded for {name} ({expected[:12]}… recorded, "
            f"{digest[:12]}… found): refused, nothing was run"
        )
    qualname = name.partition(":")[2]
    try:
        recorded = _recorded_from_file(content.decode("utf-8"), qualname)
    except (_UnrecordableError, SyntaxError, UnicodeDecodeError) as why:
        raise ProvenanceError(f"cannot take {name} alone from {path}: {why}") from None
    return _build(name, recorded)


def _recorded_from_file(text: str, qualname: str) -> dict[str, Any]:
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    top_level: dict[str, ast.stmt] = {}
    for node in tree.body:
        targets: list[str] = []
        if isinstance(node, _DEFINITION_NODES):
            targets = [node.name]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = [(a.asname or a.name).split(".")[0] for a in node.names]
        elif isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        for target in targets:
            top_level[target] = node  # the last binding wins, as when the file runs
    definitions: list[str] = []
    imports: dict[str, str] = {}
    constants: dict[str, str] = {}
    visiting: set[str] = set()

    def visit(node: ast.stmt) -> None:
        visiting.add(node.name)  # type: ignore[attr-defined]
        if len(visiting) > MAX_DEFINITIONS:
            raise _UnrecordableError(f"it needs more than {MAX_DEFINITIONS} definitions")
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        source = "".join(lines[start - 1 : node.end_lineno])
        for name in _global_names(source):
            binding = top_level.get(name)
            if name in visiting or name in imports or name in constants or binding is None:
                continue
            if isinstance(binding, _DEFINITION_NODES):
                visit(binding)
            elif isinstance(binding, (ast.Import, ast.ImportFrom)):
                imports[name] = _import_target(binding, name)
            else:
                value = binding.value  # type: ignore[attr-defined]
                try:
                    ast.literal_eval(value)
                except (ValueError, TypeError, SyntaxError):
                    raise _UnrecordableError(
                        f"global {name!r} is set by code (line {binding.lineno}), not a literal"
                    ) from None
                constants[name] = ast.get_source_segment(text, value) or ""
        definitions.append(source)

    node = top_level.get(qualname)
    if not isinstance(node, _DEFINITION_NODES):
        raise _UnrecordableError(f"it has no top-level definition of {qualname!r}")
    visit(node)
    return {
        "format": RECORDED_CODE_FORMAT,
        "defines": qualname,
        "definitions": definitions,
        "imports": imports,
        "constants": constants,
    }


def _import_target(node: ast.Import | ast.ImportFrom, name: str) -> str:
    for alias in node.names:
        bound = alias.asname or alias.name.split(".")[0]
        if bound != name:
            continue
        if isinstance(node, ast.Import):
            return alias.name if alias.asname else alias.name.split(".")[0]
        if node.level:
            raise _UnrecordableError(f"{name!r} comes from a relative import")
        return f"{node.module}:{alias.name}"
    raise _UnrecordableError(f"cannot tell where {name!r} is imported from")


def _build(name: str, recorded: Mapping[str, Any]) -> Any:
    module_name, _, qualname = name.partition(":")
    definitions = recorded.get("definitions")
    imports = recorded.get("imports", {})
    constants = recorded.get("constants", {})
    if (
        recorded.get("format") != RECORDED_CODE_FORMAT
        or not isinstance(definitions, list)
        or not all(isinstance(d, str) for d in definitions)
        or not isinstance(imports, Mapping)
        or not isinstance(constants, Mapping)
    ):
        raise ProvenanceError(
            f"the recorded code of {name} is not of format {RECORDED_CODE_FORMAT}"
        )
    compiled = []
    defined = []
    # Everything is checked before anything runs: each entry is one def or class statement.
    for index, source in enumerate(definitions):
        try:
            tree = ast.parse(source)
        except SyntaxError as error:
            raise ProvenanceError(f"the recorded code of {name} does not parse: {error}") from None
        if len(tree.body) != 1 or not isinstance(tree.body[0], _DEFINITION_NODES):
            raise ProvenanceError(
                f"the recorded code of {name} holds other statements than one definition "
                f"(entry {index}): refused, nothing was run"
            )
        filename = f"<recorded code of {name} #{index}>"
        compiled.append((filename, source, compile(tree, filename, "exec", dont_inherit=True)))
        defined.append(tree.body[0].name)
    if not defined or defined[-1] != qualname or recorded.get("defines") != qualname:
        raise ProvenanceError(f"the recorded code of {name} does not define {qualname!r}")

    from ._provenance import resolve_code_name

    namespace: dict[str, Any] = {"__name__": module_name, "__builtins__": builtins}
    for bound, target in imports.items():
        target = str(target)
        if ":" in target:
            namespace[bound] = resolve_code_name(target)
        else:
            try:
                namespace[bound] = importlib.import_module(target)
            except ImportError as error:
                raise ProvenanceError(f"{name} needs module {target!r}: {error}") from error
    for bound, text in constants.items():
        try:
            namespace[bound] = ast.literal_eval(str(text))
        except (ValueError, TypeError, SyntaxError):
            raise ProvenanceError(f"constant {bound!r} of {name} is not a literal") from None
    for filename, source, code in compiled:
        # Registered so that tracebacks and inspect show the recorded lines.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(code, namespace)  # noqa: S102 - one checked definition, asked for by the user
    return namespace[qualname]
