"""The README's "to reproduce a published number" table: one row per number in ``published.yaml``
with the exact command, generated here so a test can keep the README in step with the file."""

from __future__ import annotations

from harness.reports.published import load_published

#: published method name -> (dmlbench method, preset) of its recipe
FRPT_METHODS = {
    "pretrained": ("linear_probe", "untrained"),
    "full_finetune": ("full_finetune", "frpt_paper"),
    "frpt": ("frpt", "paper"),
    "frpt_dpp": ("frpt_dpp", "paper"),
    "frpt_cah": ("frpt_cah", "paper"),
    "frpt_no_in": ("frpt_no_in", "paper"),
    "frpt_bbox": ("frpt_bbox", "paper"),
    "frpt_cam": ("frpt_cam", "paper"),
}
VPTSPG_PRESETS = {"cub200": "cub", "cars196": "cars", "sop": "sop", "inshop": "inshop", "inaturalist": "inaturalist"}


def command(cell: dict) -> str:
    """The one command whose run reports ``cell``'s number (paper protocol: the papers' selection)."""
    if cell["method"] in ("vptsp_g", "vptsp_ema"):
        preset = VPTSPG_PRESETS[cell["dataset"]] + ("_b" if cell["backbone"].startswith("vit_base") else "")
        return f"dmlbench train --method {cell['method']} --preset {preset} --set protocol=paper --set data.root=DIR"
    method, preset = FRPT_METHODS[cell["method"]]
    shots = cell.get("setting", {}).get("data.shots", 0)
    extra = f" --set data.shots={shots}" if shots else ""
    return (
        f"dmlbench train --method {method} --preset {preset} --backbone {cell['backbone']} "
        f"--dataset {cell['dataset']}{extra} --set protocol=paper --set data.root=DIR"
    )


def reproduce_table() -> str:
    """Markdown: source, table, row / column, published value, command."""
    cells, sources, _ = load_published()
    lines = ["| source | table | row / column | published | command |", "|---|---|---|---|---|"]
    for c in cells:
        unit = "" if c["unit"] == "fraction" else (" M" if c["unit"] == "M" else " %")
        lines.append(
            f"| {c['source']} | {c['table']} | {c['row']} / {c['column']} | {c['value']}{unit} | `{command(c)}` |"
        )
    return "\n".join(lines) + "\n"
