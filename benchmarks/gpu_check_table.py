"""The one table of `benchmarks/gpu_check.sh`: each step's outcome and figures, read from the folder it wrote
(steps.tsv, test_gpu.xml, *.json), as markdown on stdout.

    python benchmarks/gpu_check_table.py DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

GOALS = {"mfu": 0.50, "vs_timm": 1.0, "zero1_vs_zero0": 0.95, "data_fed": 0.95, "stacked": 10.0}


def step_outcomes(folder: Path) -> dict[str, str]:
    outcomes = {}
    for line in (folder / "steps.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        outcomes[name] = {"0": f"ran ({seconds} s)", "124": f"stopped at its limit ({seconds} s)",
                          "skipped": "skipped: out of time"}.get(rc, f"failed, exit {rc} ({seconds} s)")
    return outcomes


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_rows(folder: Path) -> list[str]:
    path = folder / "test_gpu.xml"
    if not path.exists():
        return ["| tests/integration/test_gpu.py | no result | |"]
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        verdict = "passed"
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                verdict = f"{kind}: {(found.get('message') or '').splitlines()[0][:90] if found.get('message') else ''}"
        rows.append(f"| test_gpu::{case.get('name')} | {verdict} | {float(case.get('time', 0)):.1f} s |")
    return rows


def throughput_rows(figures: dict | None) -> list[str]:
    if not figures:
        return ["| ViT-B/16 throughput | no result | |"]
    rows = []
    by_name = {row["name"]: row for row in figures["rows"]}
    for row in figures["rows"]:
        mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] else ""
        memory = f", peak {row['peak_gb']:.1f} GB" if row["peak_gb"] else ""
        rows.append(f"| {figures['preset']} batch {figures['batch_size']}: {row['name']} | "
                    f"{row['images_per_s']:.0f} images/s{mfu}{memory} | {row['vs_timm']:.2f}x timm |")
    for suffix in ("bf16", "bf16, compiled"):
        zero0, zero1 = by_name.get(f"ours, ZeRO-0, {suffix}"), by_name.get(f"ours, ZeRO-1, {suffix}")
        if zero0 and zero1:
            ratio = zero1["images_per_s"] / zero0["images_per_s"]
            rows.append(f"| ZeRO-1 / ZeRO-0 ({suffix}) | {ratio:.3f} | goal >= {GOALS['zero1_vs_zero0']} |")
    return rows


def data_fed_row(figures: dict | None, decode: str) -> str:
    if not figures or "data_fed" not in figures:
        return f"| data-fed / synthetic-fed, decode={decode} | no result | |"
    fed = figures["data_fed"]
    return (f"| data-fed / synthetic-fed, decode={decode} ({fed['workers']} workers) | "
            f"{fed['fed'] / fed['fixed']:.3f} ({fed['fed']:.0f} vs {fed['fixed']:.0f} images/s) | "
            f"goal >= {GOALS['data_fed']} |")


def sweep_rows(figures: dict | None) -> list[str]:
    if not figures:
        return ["| stacked vs one-at-a-time proxies | no result | |"]
    shape = (f"width {figures['widths']}, depth {figures['depths']}, {figures['steps']} steps, {figures['trials']} trials, "
             f"{figures.get('lone_trials', figures['trials'])} alone{''.join('; ' + s for s in figures.get('settings', []))}")
    sizes = figures.get("stack_sizes", {})
    rows = [f"| sweep ({shape}): {name}{f' (stacks of {sizes[name]})' if name in sizes else ''} | "
            f"{mode['trials_per_min']:.1f} trials/min, overhead "
            f"{mode['overhead_s']:.2f} s per trial ({mode['overhead_share']:.0%} of the plain loop), "
            f"{mode['of_peak']:.1%} of the GEMM peak | |" for name, mode in figures["modes"].items()]
    rows.append(f"| stacked / one-at-a-time | {figures['speedup']:.2f}x trials per minute; final eval losses "
                f"differ by at most {figures['max_rel_gap']:.1e} | goal >= {GOALS['stacked']:.0f}x |")
    return rows


def main() -> None:
    folder = Path(sys.argv[1])
    env = (folder / "env.txt").read_text().strip() if (folder / "env.txt").exists() else "unknown"
    print(f"# GPU check\n\n{env}\n\n| step | outcome |\n|---|---|")
    for name, outcome in step_outcomes(folder).items():
        print(f"| {name} | {outcome} |")
    print("\n| what | measured | against |\n|---|---|---|")
    rows = test_rows(folder) + throughput_rows(load(folder, "train_throughput")) + sweep_rows(load(folder, "sweep_throughput"))
    rows += [data_fed_row(load(folder, f"data_fed_{decode}"), decode) for decode in ("cpu", "gpu")]
    print("\n".join(rows))


if __name__ == "__main__":
    main()
