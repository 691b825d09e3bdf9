"""The Rego engine wrapper: loading, decisions (cached), digest, reload and Rego tests.

Policies are Rego v1 files evaluated in-process by regorus. The entry point is
`data.kmsgate.authz.allow` (a request is allowed only when it is exactly `true`); the optional
set `data.kmsgate.authz.reasons` explains a decision. The input document is built by
`kmsgate.policy.input.policy_input`.

Decisions evaluate one rule the gateway adds to every bundle, `DECISION_ENTRY`, which gives
`allow`, `reasons` and `deny` at once. They run on regorus's compiled VM (RVM): the bundle is
compiled once per generation (two to three times faster than the interpreter). The
interpreter still loads and checks the bundle, runs the Rego tests (the compiler has no
`with`), evaluates `roles`, and decides for a bundle the compiler refuses (Rego v0 files, a
construct it lacks); tests/test_policy_vm.py checks that both give the same decisions on the
shipped policies.

regorus engines and VMs are "unsendable": they must be used and dropped only on the thread
that created them. So `PolicyEngine` keeps the policy *sources* (and the compiled program as
bytes), and each thread builds its own engine and VM from them once per policy generation and
keeps them in a module-level thread-local cache (entries of engines that are gone are dropped
by their own thread, never by another one).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import weakref
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
import regorus

from kmsgate.errors import ConfigError
from kmsgate.policy.input import policy_input

_log = logging.getLogger(__name__)

ALLOW_RULE = "data.kmsgate.authz.allow"
REASONS_RULE = "data.kmsgate.authz.reasons"
ROLES_RULE = "data.kmsgate.authz.roles"
DENY_RULE = "data.kmsgate.authz.deny"
DENIED_PREFIX = "denied: "
"""How a `deny` reason that overrode an allow reads in `Decision.reasons`."""

_TEST_SUFFIX = "_test.rego"
_TEST_PREFIX = "test_"
_NO_RULE = "not a valid rule path"
V0_SUFFIX = ".v0.rego"
"""A policy file named `*.v0.rego` is read with Rego v0 syntax (`allow { ... }` without `if`,
`default allow = false`): an existing policy brought as it is (docs/policy.md)."""
DECISION_ENTRY = "data.kmsgate.decision.result"
"""The rule that decides, on either engine: `{allow, reasons, deny}` (`DECISION_MODULE`)."""
DECISION_MODULE = (
    "package kmsgate.decision\n\nimport rego.v1\n\n"
    'result := {"allow": [a | a := data.kmsgate.authz.allow], '
    '"reasons": [x | data.kmsgate.authz.allow == true; some x in data.kmsgate.authz.reasons], '
    '"deny": [x | data.kmsgate.authz.allow == true; some x in data.kmsgate.authz.deny]}\n'
)
"""The gateway's own module, added to every bundle: `allow` as a list (`[true]` allows, `[]`
when undefined) and, only for an allowed request, the `reasons` and `deny` strings, from one
evaluation (a helper rule that `allow` and `reasons` both read is evaluated once)."""
_DECISION_FILE = "kmsgate-decision.rego"
_DECISION_CACHE_SIZE = 4096
_K = TypeVar("_K", bytes, str)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LOCATION = re.compile(r"--> (\S+:\d+:\d+)")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one policy evaluation."""

    allow: bool
    reasons: tuple[str, ...]
    failed: bool = False
    """Denied because the policy could not be evaluated (an error, logged), not by a rule."""
    digest: str | None = field(default=None, compare=False)
    """The digest of the bundle that decided (None for a decision the gateway took itself):
    what its audit record names, even if a reload swapped the bundle right after."""


@dataclass(frozen=True, slots=True)
class PolicyTestResult:
    """The outcome of one Rego `test_` rule."""

    name: str
    passed: bool
    error: str | None


# ---------------------------------------------------------------------------------------------
# Loading


def _log_failure(message: str, exc: BaseException) -> None:
    """Log an evaluation error by its type and policy location, never its text (which can
    quote input data). `message` has two %s: the type, then " at <file:line:col>" or ""."""
    match = _LOCATION.search(str(exc))
    _log.error(message, type(exc).__name__, f" at {match.group(1)}" if match else "")


def _error_text(exc: BaseException) -> str:
    """regorus error text without the Rust backtrace that RUST_BACKTRACE=1 appends."""
    text = str(exc).split("Stack backtrace:", 1)[0].strip()
    return text or type(exc).__name__


def _one_line(exc: BaseException) -> str:
    """A regorus error as one line: its policy location and its last `error:` line (the
    text in between quotes the source)."""
    text = _error_text(exc)
    match = _LOCATION.search(text)
    errors = [line.strip() for line in text.splitlines() if line.strip().startswith("error:")]
    reason = errors[-1].removeprefix("error:").strip() if errors else text.splitlines()[0]
    return f"{match.group(1)}: {reason}" if match else reason


def _rego_files(policy_dir: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """(policy files, test files) as sorted (relative posix path, path) pairs.

    Files and directories whose name starts with "." are skipped (editor files, `.git`, the
    `..data` links of a Kubernetes ConfigMap mount).
    """
    policies: list[tuple[str, Path]] = []
    tests: list[tuple[str, Path]] = []
    for path in policy_dir.rglob("*.rego"):
        rel = path.relative_to(policy_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        (tests if path.name.endswith(_TEST_SUFFIX) else policies).append((rel.as_posix(), path))
    policies.sort()
    tests.sort()
    return policies, tests


def _read_sources(files: Sequence[tuple[str, Path]]) -> tuple[tuple[str, bytes], ...]:
    out: list[tuple[str, bytes]] = []
    for rel, path in files:
        try:
            out.append((rel, path.read_bytes()))
        except OSError as exc:
            raise ConfigError(f"cannot read policy file {rel}: {exc.strerror}") from exc
    return tuple(out)


def _bundle_digest(sources: Sequence[tuple[str, bytes]]) -> str:
    """sha256 over (path, content) pairs in order, each part prefixed by its 8-byte length."""
    h = hashlib.sha256()
    for rel, content in sources:
        name = rel.encode()
        h.update(len(name).to_bytes(8, "big"))
        h.update(name)
        h.update(len(content).to_bytes(8, "big"))
        h.update(content)
    return "sha256:" + h.hexdigest()


# An engine must never be kept alive by a traceback: a traceback that ends up in a reference
# cycle is freed by the garbage collector on whatever thread happens to run it, and an
# engine dropped off its thread is leaked (with an "unsendable" warning). So the helpers
# below report problems as values and drop the engine before any exception is raised.


def _add_sources(engine: Any, sources: Sequence[tuple[str, bytes]]) -> str | None:
    """Add `sources` to `engine`; return what is wrong with the first bad file, if any."""
    for rel, content in sources:
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"invalid policy file {rel}: not UTF-8 ({exc.reason})"
        try:
            engine.set_rego_v0(rel.endswith(V0_SUFFIX))
            engine.add_policy(rel, text)
        except Exception as exc:  # regorus raises RuntimeError with the parse error
            return f"invalid policy file {rel}: {_one_line(exc)}"
    engine.set_rego_v0(False)
    engine.add_policy(_DECISION_FILE, DECISION_MODULE)
    return None


def _new_engine(sources: Sequence[tuple[str, bytes]]) -> Any:
    """A fresh regorus engine holding `sources`; raises ConfigError naming the bad file."""
    engine = regorus.Engine()
    problem = _add_sources(engine, sources)
    if problem is not None:
        del engine
        raise ConfigError(problem)
    return engine


def _probe(engine: Any, rule: str) -> str | None:
    """Why `rule` cannot be evaluated, or None (also when the bundle does not define it)."""
    try:
        engine.eval_rule(rule)
    except Exception as exc:
        if not _error_text(exc).startswith(_NO_RULE):
            return f"policy rule {rule} cannot be evaluated: {_one_line(exc)}"
    return None


_PROBE_INPUT = orjson.dumps(
    policy_input(
        principal={},
        action="policy.read",
        resource={},
        request=None,
        env="",
        now=datetime(1970, 1, 1, tzinfo=UTC),
    )
).decode()


@dataclass(frozen=True, slots=True)
class _State:
    """One loaded policy generation (immutable; swapped as a whole on reload)."""

    sources: tuple[tuple[str, bytes], ...]
    digest: str
    loaded_at: datetime
    program: bytes | None
    """The bundle compiled for the VM (serialised); None: the interpreter decides."""
    decisions: dict[bytes, Decision] = field(default_factory=dict, compare=False)
    """Decisions by serialised input; bounded by clearing when full (see decide)."""
    outcomes: dict[str, Decision] = field(default_factory=dict, compare=False)
    """Decisions by the VM's answer (its JSON text): most inputs share a few answers, so
    an evaluation skips parsing one it has seen. Bounded like `decisions`."""


def _strings(value: object) -> tuple[str, ...]:
    """The strings of a set rule's value, sorted; none for anything else (undefined)."""
    if not value or not isinstance(value, list | tuple | Set):  # a list first: the VM's
        return ()
    return tuple(sorted({v for v in value if isinstance(v, str)}))


def _decision(result: Any, digest: str | None = None) -> Decision:
    """The decision in `DECISION_ENTRY`'s value, by the bundle of `digest`: only `allow`
    exactly `true` allows, and any `deny` string overrides it. Raises KeyError/TypeError
    for a value of another shape."""
    values = result["allow"]  # `1 == True` in Python: `is` tells them apart
    vetoes = _strings(result["deny"])
    if vetoes:  # a `deny` rule overrides every allow
        reasons = tuple(DENIED_PREFIX + v for v in vetoes)
        return Decision(allow=False, reasons=reasons, digest=digest)
    allow = len(values) == 1 and values[0] is True
    return Decision(allow=allow, reasons=_strings(result["reasons"]), digest=digest)


def _remember_bounded(cache: dict[_K, Decision], key: _K, decision: Decision) -> None:
    """Keep `decision` under `key`, emptying `cache` first when it is full."""
    if len(cache) >= _DECISION_CACHE_SIZE:
        cache.clear()
    cache[key] = decision


def _refusal(engine: Any, input_doc: Mapping[str, object]) -> str | None:
    """Why the bundle in `engine` (an interpreter) does not allow `input_doc` without an
    evaluation error, or None (a value, not an exception: see `_add_sources`)."""
    action = input_doc.get("action")
    try:
        engine.set_input_json(orjson.dumps(input_doc).decode())
        decision = _decision(engine.eval_rule(DECISION_ENTRY))
    except Exception as exc:
        return f"the new policy fails to decide {action}: {_one_line(exc)}"
    if not decision.allow:
        return (
            f"the new policy would deny {action} to the principal reloading it, and no one "
            "could change it again without a restart"
        )
    return None


def _load_state(policy_dir: Path, compiled: bool) -> tuple[_State, Any]:
    """Read and check the policy bundle (compiled for the VM if `compiled`); return it and
    the engine built on this thread."""
    if not policy_dir.is_dir():
        what = "is a file, not a directory" if policy_dir.exists() else "does not exist"
        raise ConfigError(f"policy directory {policy_dir} {what}")
    files, _ = _rego_files(policy_dir)
    if not files:
        raise ConfigError(f"no .rego policy file in {policy_dir}")
    sources = _read_sources(files)
    engine = _new_engine(sources)
    engine.set_input_json(_PROBE_INPUT)
    problems = (_probe(engine, rule) for rule in (ALLOW_RULE, REASONS_RULE, DENY_RULE))
    problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        del engine
        raise ConfigError(problem)
    state = _State(
        sources=sources,
        digest=_bundle_digest(sources),
        loaded_at=datetime.now(UTC),
        program=_compile(sources) if compiled else None,
    )
    return state, engine


def _compile(sources: Sequence[tuple[str, bytes]]) -> bytes | None:
    """The bundle compiled for the VM, checked on the probe input; None (logged) when the
    compiler refuses it, and the interpreter then decides."""
    if any(rel.endswith(V0_SUFFIX) for rel, _ in sources):
        _log.info("policy decided by the regorus interpreter: Rego v0 files do not compile")
        return None
    modules = [(rel, content.decode("utf-8")) for rel, content in sources]
    modules.append((_DECISION_FILE, DECISION_MODULE))
    try:
        program = regorus.Program.compile_from_modules("{}", modules, [DECISION_ENTRY])
        vm = regorus.Rvm()
        vm.load_program(program)
        vm.set_input_json(_PROBE_INPUT)
        vm.execute_entry_point(DECISION_ENTRY)
        compiled: bytes = program.serialize_binary()
    except Exception as exc:
        _log_failure(
            "policy decided by the regorus interpreter: the compiler refused it (%s%s)", exc
        )
        return None
    return compiled


# ---------------------------------------------------------------------------------------------
# Rego test discovery


def _ref_path(node: object) -> list[str] | None:
    """The dotted path of a regorus AST reference (Var, RefDot, RefBrack with a string)."""
    if not isinstance(node, dict) or len(node) != 1:
        return None
    kind, body = next(iter(node.items()))
    if not isinstance(body, dict):
        return None
    if kind == "Var":
        value = body.get("value")
        return [value] if isinstance(value, str) else None
    base = _ref_path(body.get("refr"))
    if base is None:
        return None
    if kind == "RefDot":
        field = body.get("field")
        if isinstance(field, list) and len(field) == 2 and isinstance(field[1], str):
            return [*base, field[1]]
        return None
    if kind == "RefBrack":
        index = body.get("index")
        if isinstance(index, dict) and isinstance(index.get("String"), dict):
            value = index["String"].get("value")
            return [*base, value] if isinstance(value, str) else None
    return None


def _rule_ref(parts: Sequence[str]) -> str:
    out = "data"
    for part in parts:
        out += f".{part}" if _IDENT.match(part) else "[" + orjson.dumps(part).decode() + "]"
    return out


def _test_rules(engine: Any) -> list[str]:
    """Full references of every `test_*` rule (not functions), in source order, deduplicated."""
    modules = orjson.loads(engine.get_ast_as_json())
    names: list[str] = []
    for module in modules:
        ast = module.get("ast", {})
        package = _ref_path(ast.get("package", {}).get("refr"))
        if package is None:
            continue
        for rule in ast.get("rules", []):
            spec = rule.get("Spec")
            if not isinstance(spec, dict):
                continue
            head = spec.get("head")
            if not isinstance(head, dict) or len(head) != 1 or "Func" in head:
                continue
            path = _ref_path(next(iter(head.values())).get("refr"))
            if path and path[-1].startswith(_TEST_PREFIX):
                ref = _rule_ref([*package, *path])
                if ref not in names:
                    names.append(ref)
    return names


# ---------------------------------------------------------------------------------------------
# Engine

_THREAD = threading.local()


@dataclass(slots=True)
class _Engines:
    """One thread's interpreter and VM for one policy generation, each made on first use."""

    owner: weakref.ref[PolicyEngine]
    state: _State
    interpreter: Any = None
    vm: Any = None


def _thread_cache() -> dict[int, _Engines]:
    """This thread's regorus engines, by id of the PolicyEngine that owns them."""
    cache: dict[int, _Engines] | None = getattr(_THREAD, "engines", None)
    if cache is None:
        cache = {}
        _THREAD.engines = cache
    return cache


class PolicyEngine:
    """The loaded policy bundle; decides requests. Create with `PolicyEngine.load`."""

    def __init__(self, policy_dir: Path, state: _State, compiled: bool) -> None:
        self._policy_dir = policy_dir
        self._state = state
        self._compiled = compiled
        self._reload_lock = threading.Lock()

    @classmethod
    def load(cls, policy_dir: Path, *, compiled: bool = True) -> PolicyEngine:
        """Load every *.rego under `policy_dir` (recursively, sorted) except *_test.rego.
        `compiled=False`: the interpreter decides, even for a bundle that compiles (for
        comparing the two engines).

        Raises ConfigError (naming the file and the parse error) if a file is invalid or
        unreadable, if there is no .rego file, or if `data.kmsgate.authz.allow` (or
        `reasons`) raises an error when evaluated. A policy that does not define `allow`
        loads and denies everything.
        """
        policy_dir = Path(policy_dir)
        state, engine = _load_state(policy_dir, compiled)
        self = cls(policy_dir, state, compiled)
        self._remember(state, engine)
        return self

    @property
    def policy_dir(self) -> Path:
        return self._policy_dir

    @property
    def compiled(self) -> bool:
        """Whether the compiled VM decides (else the interpreter: a bundle the compiler
        refused, or `load(compiled=False)`)."""
        return self._state.program is not None

    @property
    def digest(self) -> str:
        """`sha256:<hex>` over the policy files that decide (not the tests); see docs/policy.md."""
        return self._state.digest

    @property
    def files(self) -> list[str]:
        """Relative posix paths of the loaded policy files, sorted."""
        return [rel for rel, _ in self._state.sources]

    @property
    def loaded_at(self) -> datetime:
        """When the current policy generation was loaded (UTC)."""
        return self._state.loaded_at

    def _engines(self, state: _State) -> _Engines:
        """This thread's engines for `state` (a new, empty entry for a new generation)."""
        cache = _thread_cache()
        entry = cache.get(id(self))
        if entry is None or entry.state is not state:
            for key in [key for key, old in cache.items() if old.owner() is None]:
                del cache[key]
            entry = cache[id(self)] = _Engines(weakref.ref(self), state)
        return entry

    def _remember(self, state: _State, engine: Any) -> None:
        """Keep `engine` (built on this thread for `state`) as this thread's interpreter."""
        self._engines(state).interpreter = engine

    def _engine(self, state: _State) -> Any:
        """This thread's interpreter for `state`."""
        entry = self._engines(state)
        if entry.interpreter is None:
            entry.interpreter = _new_engine(state.sources)
        return entry.interpreter

    def _vm(self, state: _State, program: bytes) -> Any:
        """This thread's VM for `state`, loaded with its compiled `program`."""
        entry = self._engines(state)
        if entry.vm is None:
            vm = regorus.Rvm()
            vm.load_program(regorus.Program.deserialize_binary(program)[0])
            entry.vm = vm
        return entry.vm

    def decide(self, input_doc: Mapping[str, object]) -> Decision:
        """Evaluate `allow` (only exactly `true` allows), then, for an allow, `reasons` and
        `deny`: any `deny` string overrides the allow (the decision's reasons then read
        `denied: <string>`).

        Never raises: an input that is not JSON or an evaluation error denies, and the error
        type and policy location (never input data) are logged. Thread-safe.
        """
        state = self._state
        try:
            doc = input_doc if isinstance(input_doc, dict) else dict(input_doc)
            raw = orjson.dumps(doc)
            cached = state.decisions.get(raw)
            if cached is not None:
                return cached
            decision = self._evaluate(state, raw)
        except Exception as exc:
            _log_failure("policy evaluation failed (%s%s); request denied", exc)
            return Decision(allow=False, reasons=(), failed=True, digest=state.digest)
        _remember_bounded(state.decisions, raw, decision)
        return decision

    def _evaluate(self, state: _State, raw: bytes) -> Decision:
        """The decision for the serialised input `raw`: one execution of the compiled
        bundle, or one evaluation by the interpreter (a bundle the compiler refused).
        Raises what the engine raises, or KeyError/TypeError for an answer of another
        shape."""
        if state.program is not None:
            vm = self._vm(state, state.program)
            vm.set_input_json(raw.decode())
            answer: str = vm.execute_entry_point(DECISION_ENTRY)
            decision = state.outcomes.get(answer)
            if decision is None:
                decision = _decision(orjson.loads(answer), state.digest)
                _remember_bounded(state.outcomes, answer, decision)
            return decision
        engine = self._engine(state)
        engine.set_input_json(raw.decode())
        return _decision(engine.eval_rule(DECISION_ENTRY), state.digest)

    def roles(self, input_doc: Mapping[str, object]) -> tuple[str, ...]:
        """The roles the policy maps the principal of `input_doc` to (`roles`, sorted);
        none when the policy defines no `roles`. Never raises: an evaluation error is
        logged (its type and location) and maps to no role. Thread-safe."""
        state = self._state
        try:
            engine = self._engine(state)
            engine.set_input_json(orjson.dumps(dict(input_doc)).decode())
            roles = engine.eval_rule(ROLES_RULE)
        except Exception as exc:
            if not _error_text(exc).startswith(_NO_RULE):
                _log_failure("policy roles evaluation failed (%s%s)", exc)
            return ()
        return _strings(roles)

    def reload(self, *, must_allow: Mapping[str, object] | None = None) -> str:
        """Re-read the policy directory, swap it in atomically and return the new digest.

        `must_allow`: a policy input (the reload request itself) that the new bundle must
        allow without an evaluation error, so that a reload never leaves the policy
        impossible to change again (a bundle whose rules conflict for some input, such as
        `allow := "yes"` beside `allow if ...`, fails only when that input comes).

        Raises ConfigError, keeping the current policy, if the new bundle is invalid or
        does not allow `must_allow`. An unchanged bundle keeps the current generation (and
        `loaded_at`).
        """
        with self._reload_lock:
            state, engine = _load_state(self._policy_dir, self._compiled)
            current = self._state
            if state.sources == current.sources:
                return current.digest
            problem = _refusal(engine, must_allow) if must_allow is not None else None
            if problem is not None:
                del engine
                raise ConfigError(problem)
            self._state = state
            self._remember(state, engine)
            _log.info("policy reloaded: %s (%d files)", state.digest, len(state.sources))
            return state.digest

    def run_tests(self) -> list[PolicyTestResult]:
        """Run the Rego tests: every `test_*` rule (not function) of every package.

        The loaded policy plus the *_test.rego files currently in the policy directory go
        into a fresh engine; a test passes iff its rule evaluates to exactly `true` (use
        `with input as {...}`). An evaluation error fails that test with the error text.
        Raises ConfigError if a test file cannot be read or parsed.
        """
        _, test_files = _rego_files(self._policy_dir)
        engine = _new_engine(self._state.sources + _read_sources(test_files))
        results: list[PolicyTestResult] = []
        try:
            for ref in _test_rules(engine):
                try:
                    value = engine.eval_rule(ref)
                except Exception as exc:
                    results.append(PolicyTestResult(ref, False, _one_line(exc)))
                    continue
                results.append(PolicyTestResult(ref, value is True, None))
        finally:
            del engine  # never left to a traceback (see _add_sources)
        return results
