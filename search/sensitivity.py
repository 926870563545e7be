"""A search's per-layer sensitivity report as rows, CSV and JSON, with what each layer's numbers suggest.

The sqnr search measures, for every layer, the damage its weights (and its input activations, when their widths
are searched) cause at each width (`SearchResult.sensitivity`, built in search/searches/sqnr.py and stored by the
worker as `Job.sensitivity`). This module turns that dict into one row per layer: its damage at every width, the
widths the recommended candidate chose, and how the model's total damage would move if the layer took one width
less or one more. docs/methods.md#reading-the-sensitivity-report explains the columns.

Pure stdlib and pydantic (no torch): the API imports it to serve reports.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "SENSITIVITY_METHODS",
    "ZERO_DAMAGE",
    "SensitivityError",
    "SensitivityTables",
    "column_meanings",
    "no_sensitivity_reason",
    "report_columns",
    "report_csv",
    "report_json",
    "report_rows",
    "write_report",
]

# The methods whose search sets SearchContext.sensitivity (search/searches/sqnr.py); every other method's
# SearchResult.sensitivity is None. Checked before a search runs, so `--report` is refused before the work.
SENSITIVITY_METHODS = ("sqnr",)

# sqnr shifts each tensor's damage table so its least entry is 1e-12, not 0 (a per-tensor constant does not move
# the allocation). A ratio to a damage this small measures that offset, not the layer, so it is left empty.
ZERO_DAMAGE = 1e-11

KINDS = (("w", "weight", "W"), ("a", "activation", "A"))


class SensitivityError(ValueError):
    """No report can be made: the method measures no sensitivity, or the tables are malformed."""


class LayerTables(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    op: str
    params: int
    macs: int
    weight: dict[int, float]  # width -> damage; JSON keys are strings, validated to ints
    activation: dict[int, float] = {}  # empty when the search kept the activation widths fixed


class ChosenWidths(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    w_bits: dict[str, int]
    a_bits: dict[str, int]


class SensitivityTables(BaseModel):
    """`SearchResult.sensitivity` (or a job's stored copy), validated: widths as ints, every damage a float."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    method: str
    propagation: str
    quantity: str
    layers: list[LayerTables]
    chosen: ChosenWidths | None = None  # the recommended candidate's widths; None when none met the budget

    @classmethod
    def parse(cls, sensitivity: dict | None, method: str | None = None) -> SensitivityTables:
        if sensitivity is None:
            raise SensitivityError(no_sensitivity_reason(method or "this"))
        try:
            return cls.model_validate(sensitivity)
        except ValidationError as e:
            raise SensitivityError(f"malformed sensitivity tables: {e.errors()[0]['msg']}") from None

    def widths(self, kind: str) -> list[int]:
        """Every width measured for weights ("weight") or activations ("activation"), narrowest first."""
        return sorted({b for layer in self.layers for b in getattr(layer, kind)})


def no_sensitivity_reason(method: str) -> str:
    return (
        f"method {method} does not measure per-layer sensitivity; "
        f"run {' or '.join(SENSITIVITY_METHODS)} on the same model and data"
    )


def _chosen(tables: SensitivityTables, kind: str, name: str) -> int | None:
    if tables.chosen is None:
        return None
    return getattr(tables.chosen, f"{kind}_bits").get(name)


def _neighbour(table: dict[int, float], bits: int | None, step: int) -> int | None:
    """The next measured width below (step -1) or above (+1) `bits`, or None."""
    if bits is None or bits not in table:
        return None
    side = [b for b in table if (b < bits if step < 0 else b > bits)]
    return (max if step < 0 else min)(side, default=None)


def _total_damage(tables: SensitivityTables) -> float | None:
    """The damage of the chosen config as the search models it: the sum of every tensor's damage at its width."""
    if tables.chosen is None:
        return None
    total = 0.0
    for layer in tables.layers:
        for kind, field, _ in KINDS:
            table, bits = getattr(layer, field), _chosen(tables, kind, layer.name)
            if table and bits in table:
                total += table[bits]
    return total


def report_columns(tables: SensitivityTables) -> list[str]:
    """The CSV header, in order: what the layer is, its damage at every width, then the chosen widths and
    what one width less or more would do."""
    columns = ["layer", "op", "params", "macs"]
    columns += [f"w{b}_damage" for b in tables.widths("weight")]
    columns += [f"a{b}_damage" for b in tables.widths("activation")]
    for kind, field, _ in KINDS:
        columns.append(f"{kind}_chosen_bits")
        if tables.widths(field):
            columns += [
                f"{kind}_chosen_damage",
                f"{kind}_share_of_total_damage",
                f"{kind}_narrower_damage_ratio",
                f"{kind}_narrower_adds_to_total",
                f"{kind}_wider_removes_from_total",
            ]
    return columns + ["summary"]


def column_meanings(tables: SensitivityTables) -> dict[str, str]:
    """Each column's meaning, for the JSON report (the CSV's header names are meant to be read alone)."""
    meanings = {
        "layer": "the layer's name in the model",
        "op": "conv1d, conv2d or linear",
        "params": "weights in the layer",
        "macs": "multiply-accumulates per sample",
    }
    for b in tables.widths("weight"):
        meanings[f"w{b}_damage"] = f"damage with this layer's weights at {b} bits ({tables.quantity})"
    for b in tables.widths("activation"):
        meanings[f"a{b}_damage"] = f"damage with this layer's input activations at {b} bits"
    for kind, field, _ in KINDS:
        what = "weights" if kind == "w" else "input activations"
        meanings[f"{kind}_chosen_bits"] = f"the recommended candidate's width for the layer's {what}"
        if tables.widths(field):
            meanings |= {
                f"{kind}_chosen_damage": "the damage at the chosen width",
                f"{kind}_share_of_total_damage": "that damage over the chosen config's total (every layer's "
                "weights and measured activations at their chosen widths): where the remaining error comes from",
                f"{kind}_narrower_damage_ratio": "damage at the next narrower width measured over the damage at the "
                "chosen one; empty at the narrowest width, or when the chosen damage is 0 (the layer's least)",
                f"{kind}_narrower_adds_to_total": "how much one width less on this layer alone would add to the "
                "total damage, as a fraction of it (0.5: the total grows by half)",
                f"{kind}_wider_removes_from_total": "how much one width more on this layer alone would remove from "
                "the total damage, as a fraction of it",
            }
    meanings["summary"] = "the same in words"
    return meanings


def _rounded(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")


def _percent(x: float) -> str:
    return f"{100 * x:.3g}%"


def report_rows(tables: SensitivityTables) -> list[dict]:
    """One row per layer, in the model's order, keyed by report_columns(tables); missing values are None."""
    total = _total_damage(tables)
    widths = {field: tables.widths(field) for _, field, _ in KINDS}
    rows = []
    for layer in tables.layers:
        row: dict = {"layer": layer.name, "op": layer.op, "params": layer.params, "macs": layer.macs}
        for kind, field, _ in KINDS:
            table = getattr(layer, field)
            for b in widths[field]:
                row[f"{kind}{b}_damage"] = table.get(b)
        notes = []
        for kind, field, letter in KINDS:
            table, bits = getattr(layer, field), _chosen(tables, kind, layer.name)
            row[f"{kind}_chosen_bits"] = bits
            if not widths[field]:
                continue
            here = table.get(bits) if bits is not None else None
            lower, upper = _neighbour(table, bits, -1), _neighbour(table, bits, +1)
            usable = here is not None and total is not None and total > 0
            row[f"{kind}_chosen_damage"] = here
            row[f"{kind}_share_of_total_damage"] = _rounded(here / total) if usable else None
            row[f"{kind}_narrower_damage_ratio"] = (
                _rounded(table[lower] / here) if lower is not None and here is not None and here > ZERO_DAMAGE else None
            )
            adds = (table[lower] - here) / total if usable and lower is not None else None
            removes = (here - table[upper]) / total if usable and upper is not None else None
            row[f"{kind}_narrower_adds_to_total"] = _rounded(adds)
            row[f"{kind}_wider_removes_from_total"] = _rounded(removes)
            if usable:
                note = f"{letter}{bits}: {_percent(here / total)} of the total damage"
                note += (
                    f"; {letter}{lower} would add {_percent(adds)}"
                    if lower is not None
                    else "; narrowest width measured"
                )
                note += (
                    f"; {letter}{upper} would remove {_percent(removes)}"
                    if upper is not None
                    else "; widest width measured"
                )
                notes.append(note)
        row["summary"] = " | ".join(notes) if notes else None
        rows.append(row)
    return rows


def report_csv(tables: SensitivityTables) -> str:
    """The rows as CSV with a header row; an empty cell is a value that does not apply (see column_meanings)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=report_columns(tables), lineterminator="\n")
    writer.writeheader()
    for row in report_rows(tables):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def report_json(tables: SensitivityTables) -> dict:
    """The report as one JSON-ready object: what was measured, the widths, the column meanings and the rows."""
    total = _total_damage(tables)
    return {
        "method": tables.method,
        "propagation": tables.propagation,
        "quantity": tables.quantity,
        "weight_widths": tables.widths("weight"),
        "activation_widths": tables.widths("activation"),
        "chosen_total_damage": total,
        "columns": column_meanings(tables),
        "layers": report_rows(tables),
    }


def write_report(tables: SensitivityTables, path: str | Path) -> str:
    """Write the report to `path`: CSV when its name ends in .csv, else JSON. Returns the format written."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        path.write_text(report_csv(tables))
        return "csv"
    path.write_text(json.dumps(report_json(tables), indent=2) + "\n")
    return "json"
