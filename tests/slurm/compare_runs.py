"""Whether two study output folders hold the same results (tests/slurm/run_test.sh).

    python tests/slurm/compare_runs.py REFERENCE_DIR OTHER_DIR

Same means: report.md and report.csv byte for byte (they hold no timings), and every safetensors
file the study wrote with the same tensors, bit for bit: the deltas (sources, initialisations,
tuned targets) and each run's resume.safetensors (its last delta, optimizer state and RNG state,
so a resumed run must have followed the same path to the end). The .json sidecars are not
compared: they name absolute paths.
Prints what differs and exits 1, or prints what was compared and exits 0.
"""
import sys
from pathlib import Path

REPORT_FILES = ("report.md", "report.csv")


def delta_files(root: Path) -> list:
    return sorted(p.relative_to(root) for p in root.rglob("*.safetensors"))


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                                        and bool((x[k] == y[k]).all()) for k in x)


def compare(ref: Path, other: Path) -> list:
    problems = []
    for name in REPORT_FILES:
        if not (ref / name).is_file() or not (other / name).is_file():
            problems.append(f"{name}: missing in {ref if not (ref / name).is_file() else other}")
        elif (ref / name).read_bytes() != (other / name).read_bytes():
            problems.append(f"{name}: differs between {ref} and {other}")
    ref_deltas, other_deltas = delta_files(ref), delta_files(other)
    if ref_deltas != other_deltas:
        only = sorted(set(ref_deltas) ^ set(other_deltas))
        problems.append(f"safetensors files: {len(ref_deltas)} vs {len(other_deltas)} files; in one only: "
                        + ", ".join(map(str, only[:5])))
    for rel in sorted(set(ref_deltas) & set(other_deltas)):
        if not same_tensors(ref / rel, other / rel):
            problems.append(f"{rel}: other tensors")
    if not ref_deltas:
        problems.append(f"{ref}: no safetensors files to compare")
    return problems, len(ref_deltas)


def main(argv):
    if len(argv) != 2:
        print("usage: compare_runs.py REFERENCE_DIR OTHER_DIR", file=sys.stderr)
        return 2
    ref, other = Path(argv[0]), Path(argv[1])
    problems, n = compare(ref, other)
    for p in problems:
        print(f"DIFFERENT: {p}")
    if problems:
        return 1
    print(f"same: {', '.join(REPORT_FILES)} byte for byte and {n} safetensors files (deltas, resume states) tensor for tensor ({other} vs {ref})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
