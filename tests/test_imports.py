"""The package's import graph, read from the source with lazy imports included: no cycle, and the
serving front end and its ranks meet only in the contract."""

from __future__ import annotations

from zp_compile import imports

SHARED = {"zp_compile.contract", "zp_compile.prefix"}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v) :] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def _graph() -> dict[str, set[str]]:
    return {m: imports.imports_of(m) for m in imports.modules()}


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_walk_sees_lazy_imports_inside_functions():
    # rank.worker imports zp_compile.threshold only inside serve() (when the ranks measure T).
    assert "zp_compile.threshold" in imports.imports_of("zp_compile.rank.worker")
    assert "zp_compile.rank.worker" in imports.imports_of("zp_compile.rank.__main__")


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_front_end_and_ranks_meet_only_in_the_contract():
    graph = _graph()
    crossings = []
    for side, other in (("zp_compile.server", "zp_compile.rank"), ("zp_compile.rank", "zp_compile.server")):
        for m, targets in graph.items():
            if m == side or m.startswith(side + "."):
                crossings += [(m, t) for t in targets if t == other or t.startswith(other + ".")]
    assert crossings == []
    # Both sides do use the contract (the check above is not vacuous).
    assert "zp_compile.contract" in graph["zp_compile.server.ranks"] and "zp_compile.contract" in graph["zp_compile.rank.worker"]
    # And the contract itself imports neither side.
    assert not {t for m in SHARED for t in imports.closure(m) if t.startswith(("zp_compile.server", "zp_compile.rank"))}


def test_the_server_reaches_the_cost_model_without_the_planner():
    assert not {t for t in imports.closure("zp_compile.server.app") if t == "zp_compile.costmodel.planning"}


def test_no_module_over_450_lines():
    long = {m: n for m, p in imports.modules().items() if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def test_the_pass_cache_key_hashes_every_file_the_passes_import(monkeypatch):
    from zp_compile import backend

    hashed = []
    monkeypatch.setattr(backend, "get_hash_for_files", lambda files, extra: hashed.extend(files) or b"key")
    backend.ZeroPrefillGraphPass(1).uuid()
    names = {p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in hashed}
    # sharding.py (the lowering's unshard), ops.py and compat.py were missing from the old hand list.
    assert {"zp_compile/sharding.py", "zp_compile/ops.py", "zp_compile/compat.py", "passes/lower_gathers.py"} <= names
    assert not any("server" in p or "rank" in p for p in hashed)


def test_a_missing_private_torch_api_names_itself_and_the_torch_version(monkeypatch):
    import torch

    from zp_compile import compat

    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    try:
        compat.storage_use_count(torch.empty(1).untyped_storage())
    except compat.TorchCompatError as e:
        assert "torch._C._storage_Use_Count" in str(e) and torch.__version__ in str(e)
    else:
        raise AssertionError("no TorchCompatError")
