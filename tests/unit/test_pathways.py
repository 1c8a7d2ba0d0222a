"""Pathway selection from GO: each rule on hand-made gene sets, GMT and annotation-table sources
agreeing, the saved form, error messages, and the rules' invariants on the real GO files."""

import gzip
import itertools
import json
import logging

import numpy as np
import pandas as pd
import pytest

from pertscale.config import ConfigError
from pertscale.data.pathways import PathwaySelection, PathwaySelectionConfig, select_pathways


def _genes(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _write_gmt(path, sets: dict[str, list[str]], names: dict[str, str] | None = None) -> str:
    names = names or {}
    path.write_text("".join("\t".join([t, names.get(t, f"{t} set"), *g]) + "\n"
                            for t, g in sets.items()))
    return str(path)


def _write_dag(path, edges: list[tuple[str, str, str]], column: str = "relationship") -> str:
    pd.DataFrame(edges, columns=["child", "parent", column]).to_csv(path, sep="\t", index=False)
    return str(path)


def _select(tmp_path, sets, data=None, edges=None, **kw) -> PathwaySelection:
    gmt = _write_gmt(tmp_path / "sets.gmt", sets)
    dag = _write_dag(tmp_path / "dag.tsv", edges) if edges else ""
    data = data if data is not None else sorted({g for m in sets.values() for g in m})
    return select_pathways(PathwaySelectionConfig(gmt=gmt, dag_edges=dag, **kw), data)


def _removed(sel: PathwaySelection) -> list[int]:
    return [removed for _, removed, _ in sel.report]


def test_size_rule_keeps_sets_below_max_genes_counted_over_the_source(tmp_path):
    sets = {"S29": _genes("a", 29), "S30": _genes("b", 30), "S31": _genes("c", 31),
            "S40": _genes("d", 5) + _genes("x", 35)}
    data = _genes("a", 29) + _genes("b", 30) + _genes("c", 31) + _genes("d", 5)
    sel = _select(tmp_path, sets, data)
    # S40 has only 5 genes in the data, but 40 in the source: the size rule counts the source
    assert sel.term_ids == ["S29"]
    assert _removed(sel) == [3, 0, 0, 0]


def test_redundancy_drops_more_than_half_and_keeps_exactly_half(tmp_path):
    sets = {
        "A": _genes("a", 8),  # largest: visited first, kept
        "B": _genes("a", 4) + ["b1", "b2"],  # 4/6 of its genes in A: dropped
        "C": _genes("a", 3) + ["c1", "c2", "c3"],  # exactly 3/6 in A: kept
        "E": ["a4", "b1", "b2", "e1", "e2"],  # 3/5 in B, but B was dropped: kept
    }
    sel = _select(tmp_path, sets, min_genes_present=3)
    assert sel.term_ids == ["A", "C", "E"]
    assert _removed(sel) == [0, 1, 0, 0]
    assert sel.report[1][2] == 3


def test_redundancy_is_greedy_by_size_then_id_whatever_the_file_order(tmp_path):
    sets = {"Z": _genes("g", 6), "Y": _genes("g", 6), "X": _genes("g", 5) + ["h"]}
    for i, order in enumerate(itertools.permutations(sets)):
        sub = tmp_path / str(i)
        sub.mkdir()
        sel = _select(sub, {t: sets[t] for t in order})
        # X (6 genes, smallest id among the 6-gene sets) kept; Y and Z share 5/6 with it
        assert sel.term_ids == ["X"], order


def test_presence_rule_counts_data_genes_and_restricts_members(tmp_path):
    sets = {"P5": _genes("p", 8), "P4": _genes("q", 8)}
    data = _genes("p", 5) + _genes("q", 4) + ["unrelated"]
    sel = _select(tmp_path, sets, data)
    assert sel.term_ids == ["P5"]
    assert sel.genes == [sorted(_genes("p", 5))]
    assert _removed(sel) == [0, 0, 1, 0]


def test_ancestor_rule_follows_a_two_step_chain(tmp_path):
    sets = {"GO:1": _genes("r", 6), "GO:3": _genes("l", 6), "GO:9": _genes("o", 6)}
    edges = [("GO:3", "GO:2", "is_a"), ("GO:2", "GO:1", "part_of"), ("GO:9", "GO:8", "is_a")]
    sel = _select(tmp_path, sets, edges=edges)
    assert sel.term_ids == ["GO:3", "GO:9"]  # GO:1 is the grandparent of GO:3
    assert _removed(sel) == [0, 0, 0, 1]


def test_ancestor_rule_follows_only_the_configured_relations(tmp_path):
    sets = {"GO:1": _genes("r", 6), "GO:3": _genes("l", 6)}
    edges = [("GO:3", "GO:2", "regulates"), ("GO:2", "GO:1", "is_a")]
    assert _select(tmp_path, sets, edges=edges).term_ids == ["GO:1", "GO:3"]
    sel = _select(tmp_path, sets, edges=edges, relations=["is_a", "regulates"])
    assert sel.term_ids == ["GO:3"]


def test_without_a_dag_the_ancestor_rule_is_skipped_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pertscale.data.pathways"):
        sel = _select(tmp_path, {"GO:1": _genes("r", 6)})
    assert "skipped" in sel.report[3][0] and "rule 4" in caplog.text


# An equivalent example in both layouts: direct annotations + DAG, and the propagated GMT.
DIRECT = {"T1a": _genes("a", 7), "T1": _genes("b", 6), "T2": _genes("c", 8),
          "R": _genes("r", 15), "Q": _genes("q", 6), "TX": ["x0"]}
DAG = [("T1a", "T1", "part of"), ("T1", "R", "isa"), ("T2", "R", "isa"),
       ("Q", "T2", "regulates"), ("TX", "T1a", "is_a")]


def _propagated() -> dict[str, list[str]]:
    parents: dict[str, list[str]] = {}
    for child, parent, relation in DAG:
        if relation != "regulates":
            parents.setdefault(child, []).append(parent)
    sets: dict[str, set[str]] = {}
    for term, genes in DIRECT.items():
        todo = [term]
        while todo:
            t = todo.pop()
            sets.setdefault(t, set()).update(genes)
            todo += parents.get(t, [])
    return {t: sorted(g) for t, g in sets.items()}


def test_gmt_and_annotation_table_give_the_same_selection(tmp_path):
    rows = [(g, t, "BP") for t, genes in DIRECT.items() for g in genes]
    rows.append(("b0", "MF1", "MF"))  # another ontology: ignored by default
    table = tmp_path / "go.tsv.gz"
    with gzip.open(table, "wt") as f:
        pd.DataFrame(rows, columns=["gene_symbol", "go_id", "ontology"]).to_csv(
            f, sep="\t", index=False)
    dag = _write_dag(tmp_path / "dag.tsv", DAG, column="relation")
    terms = tmp_path / "terms.tsv"
    pd.DataFrame({"go_id": list(DIRECT), "name": [f"term {t}" for t in DIRECT]}).to_csv(
        terms, sep="\t", index=False)
    gmt = _write_gmt(tmp_path / "sets.gmt", _propagated())
    data = [g for g in sorted({g for m in DIRECT.values() for g in m}) if g not in ("q0", "q1")]
    from_table = select_pathways(PathwaySelectionConfig(
        go_table=str(table), dag_edges=dag, go_terms=str(terms)), data)
    from_gmt = select_pathways(PathwaySelectionConfig(
        gmt=gmt, dag_edges=dag, go_terms=str(terms)), data)
    # R (37 genes) too large; T1a and TX inside T1; Q has 4 genes in the data
    assert from_table.term_ids == from_gmt.term_ids == ["T1", "T2"]
    assert from_table.genes == from_gmt.genes
    assert from_table.names == from_gmt.names == ["term T1", "term T2"]
    assert from_table.report == from_gmt.report


def test_term_names_from_a_go_terms_file_with_swapped_headers(tmp_path, caplog):
    terms = tmp_path / "terms.tsv"
    terms.write_text("go_id\tontology\tname\nGO:1\tinterferon response\tBP\n")
    gmt = _write_gmt(tmp_path / "sets.gmt", {"GO:1": _genes("g", 6)})
    with caplog.at_level(logging.WARNING, logger="pertscale.data.pathways"):
        sel = select_pathways(PathwaySelectionConfig(gmt=gmt, go_terms=str(terms)),
                              _genes("g", 6))
    assert sel.names == ["interferon response"] and "swapped" in caplog.text


def test_round_trip_through_json_and_gene_index_membership(tmp_path):
    sets = {"B": _genes("b", 6), "A": _genes("a", 7)}
    sel = _select(tmp_path, sets)
    back = PathwaySelection.from_dict(json.loads(json.dumps(sel.to_dict())))
    assert back == sel and back.term_ids == ["A", "B"]
    panel = ["b5", "zz", "a0", "b0", "a3"]
    indptr, indices = back.members(panel)
    assert indptr.tolist() == [0, 2, 4]
    assert indices.tolist() == [2, 4, 0, 3]
    with pytest.raises(ValueError, match="more than once"):
        back.members(["a0", "a0"])
    with pytest.raises(ValueError, match="needs keys"):
        PathwaySelection.from_dict({"term_ids": []})


def test_errors_name_the_file_the_line_and_the_emptying_rule(tmp_path):
    missing = tmp_path / "nope.gmt"
    with pytest.raises(ValueError, match=f"gmt file {missing} does not exist"):
        select_pathways(PathwaySelectionConfig(gmt=str(missing)), ["a"])
    bad = tmp_path / "bad.gmt"
    bad.write_text("S1\tdesc\ta\tb\nS2\tno genes here\n")
    with pytest.raises(ValueError, match=rf"gmt file {bad} line 2"):
        select_pathways(PathwaySelectionConfig(gmt=str(bad)), ["a"])
    with pytest.raises(ValueError, match=r"rule 3 \(at least 5 genes in the data\)"):
        _select(tmp_path, {"S": _genes("s", 6)}, data=["s0"])
    gmt = _write_gmt(tmp_path / "go.gmt", {"GO:1": _genes("g", 6), "GO:2": _genes("h", 6)})
    cycle = _write_dag(tmp_path / "cycle.tsv", [("GO:1", "GO:2", "is_a"), ("GO:2", "GO:1", "isa")])
    with pytest.raises(ValueError, match=f"dag_edges file {cycle} has a cycle"):
        select_pathways(PathwaySelectionConfig(gmt=gmt, dag_edges=cycle), _genes("g", 6))
    other = _write_dag(tmp_path / "other.tsv", [("GO:7", "GO:8", "is_a")])
    with pytest.raises(ValueError, match=f"none of the 2 term ids of gmt file {gmt}"):
        select_pathways(PathwaySelectionConfig(gmt=gmt, dag_edges=other), _genes("g", 6))
    with pytest.raises(ValueError, match="dag_edges file .* needs a relation column"):
        pd.DataFrame({"child": ["a"], "parent": ["b"]}).to_csv(tmp_path / "d.tsv", sep="\t")
        select_pathways(PathwaySelectionConfig(gmt=_write_gmt(tmp_path / "s.gmt", {"a": ["x"]}),
                                               dag_edges=str(tmp_path / "d.tsv")), ["x"])


@pytest.mark.parametrize("kw, match", [
    ({"gmt": "a.gmt", "go_table": "b.tsv"}, "not both"),
    ({"go_table": "b.tsv"}, "needs dag_edges"),
    ({"ontologies": ["XX"]}, r"ontologies\[0\]"),
    ({"relations": []}, "relations must list"),
    ({"max_shared_fraction": 1.5}, "max_shared_fraction"),
    ({"min_genes_present": 30}, "must be below max_genes"),
])
def test_config_rejects_bad_values_naming_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        PathwaySelectionConfig(**kw)


def test_real_go_selection_keeps_the_rules_invariants(shared_data):
    """The GO BP GMT and DAG of ../shared/data/go, data genes = the first 2,000 NCBI genes."""
    go = shared_data / "go"
    gmt, dag = go / "go_bp_propagated_5_500.gmt", go / "go_dag_edges.tsv.gz"
    data = pd.read_csv(go / "human_gene_info.tsv.gz", sep="\t", usecols=["symbol"], nrows=2000,
                       dtype=str)["symbol"].tolist()
    sel = select_pathways(PathwaySelectionConfig(gmt=str(gmt), dag_edges=str(dag)), data)
    assert sel.num_pathways > 0 and sel.report[-1][2] == sel.num_pathways
    source = {line.split("\t")[0]: set(line.rstrip("\n").split("\t")[2:])
              for line in gmt.read_text().splitlines(keepends=True)}
    chosen = [source[t] for t in sel.term_ids]
    assert all(len(s) < 30 for s in chosen)
    assert all(len(g) >= 5 and set(g) <= set(data) for g in sel.genes)
    for a, b in itertools.combinations(chosen, 2):
        assert len(a & b) <= 0.5 * min(len(a), len(b))
    edges = pd.read_csv(dag, sep="\t", dtype=str)
    edges = edges[edges["relationship"].isin(["isa", "part of"])]
    parents = edges.groupby("child")["parent"].agg(list).to_dict()
    ancestors: set[str] = set()
    todo = [p for t in sel.term_ids for p in parents.get(t, [])]
    while todo:
        t = todo.pop()
        if t not in ancestors:
            ancestors.add(t)
            todo += parents.get(t, [])
    assert not ancestors & set(sel.term_ids)
    assert np.all(np.diff(sel.members(data)[0]) == [len(g) for g in sel.genes])
