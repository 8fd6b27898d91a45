"""LoRA deltas between this project's checkpoints and peft adapter folders, both ways.

    python scripts/convert_peft.py --from_peft hub/flan_t5_large-bool_q --to bool_q.safetensors
    python scripts/convert_peft.py --from_peft hub --to sources/lora --allow_bin   # a collection: hub/{name}/
    python scripts/convert_peft.py --to_peft runs/lora/init/average --out peft/average --base_model google/flan-t5-large

A peft folder is ``adapter_config.json`` + ``adapter_model.safetensors`` (older ones: the pickle
``adapter_model.bin``, read only with --allow_bin). Every entry point reads peft folders as they are
(a source folder may hold ``{task}/`` peft folders); converting a collection once spares reading its
pickles again. ``--to_peft`` takes one delta file, a folder of source deltas ({task}/checkpoint-best*)
or an averaged-delta folder (without_{task}_checkpoint.safetensors) and writes folders that
``PeftModel.from_pretrained(t5, folder)`` loads. What a plain LoRA on every block of a T5 cannot
hold (DoRA, LoRA bias, modules_to_save, layers_to_transform, per-layer ranks or alphas, another
model family) is refused with one error line naming the field.

Every tunable below can be overridden as --name=value or --name value; `--help` lists them.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: run from anywhere

from_peft = ""  # a peft LoRA folder of a T5, or a folder of them (a collection: {name}/adapter_config.json)
to = ""  # with --from_peft: the delta file written (.safetensors); for a collection, a folder for {name}/checkpoint-best
to_peft = ""  # a LoRA delta (.safetensors), a folder of {task}/checkpoint-best*, or of without_{task}_checkpoint*
out = ""  # with --to_peft: the peft folder written; for a folder of deltas, out/{task}/ for each
base_model = ""  # with --to_peft: the base_model_name_or_path written ("" = the base_model the delta records)
allow_bin = False  # read adapter_model.bin: a pickle; read with torch.load(weights_only=True), which refuses code but is still a pickle format
progress = True  # a progress bar over the deltas of a folder


def main(argv=None):
    from pewe.cli import run_cli
    from pewe.configurator import configure

    a = configure(globals(), __file__, argv)
    return run_cli(_run, a)


def peft_to_ours(src: Path, dst: Path, allow):
    import delta_modules as dm

    tensors, config, meta = dm.read_delta(src, allow_bin=allow)
    dm.save_delta(dst, tensors, config, **meta)
    return config


def ours_to_peft(src: Path, dst: Path, base, allow):
    import delta_modules as dm

    tensors, config, meta = dm.read_delta(src, allow_bin=allow)
    dm.write_peft(dst, tensors, config, base_model=base or meta.get("base_model"))
    return config


def describe(config) -> str:
    scale = f"alpha / sqrt(r) = {config.lora_scale:g}" if config.lora_rslora else f"alpha / r = {config.lora_scale:g}"
    return f"LoRA r {config.lora_r}, alpha {config.lora_alpha} ({scale}) on {' '.join(config.lora_targets)}"


def deltas_to_export(folder: Path) -> dict:
    """{task: delta} of a folder: its averaged deltas (without_{task}_checkpoint.safetensors), or else
    its source deltas ({task}/checkpoint-best*)."""
    from pewe import layout as L

    averaged = sorted(folder.glob(L.INIT_PATTERN.format(task="*")))
    if averaged:
        prefix, suffix = L.INIT_PATTERN.split("{task}")
        return {p.name[len(prefix):-len(suffix)]: p for p in averaged}
    return L.source_checkpoints(folder)


def _run(a):
    from tqdm import tqdm

    import delta_modules as dm
    from pewe.errors import UserError

    allow = True if a.allow_bin else None  # None: read_delta asks PEWE_ALLOW_PEFT_BIN
    if bool(a.from_peft) == bool(a.to_peft):
        raise UserError("give --from_peft DIR --to FILE.safetensors, or --to_peft FILE_OR_DIR --out DIR (one of them)")
    if a.from_peft:
        src, dst = Path(a.from_peft), Path(a.to) if a.to else None
        if dst is None:
            raise UserError("--from_peft needs --to (FILE.safetensors, or a folder for a collection)")
        if dm.is_peft_folder(src):
            if dst.suffix != ".safetensors":
                raise UserError(f"--to {dst}: a delta file must end in .safetensors")
            print(f"wrote {dst}: {describe(peft_to_ours(src, dst, allow))}")
            return
        if not src.is_dir():
            raise UserError(f"--from_peft {src}: no such folder")
        modules = [d for d in sorted(src.iterdir()) if dm.is_peft_folder(d)]
        if not modules:
            raise UserError(f"--from_peft {src}: neither a peft adapter folder nor a folder of them "
                            f"({{name}}/{dm.PEFT_CONFIG})")
        if dst.suffix == ".safetensors":
            raise UserError(f"--to {dst}: {src} holds {len(modules)} adapters; give a folder")
        pickled = [d for d in modules if dm.peft_weights_path(d) and dm.peft_weights_path(d).name == dm.PEFT_PICKLE]
        if pickled and allow is None and os.environ.get(dm.PEFT_BIN_ENV) != "1":  # refused before any is written
            raise UserError(f"{pickled[0]}: {len(pickled)} of the {len(modules)} adapters hold only {dm.PEFT_PICKLE}, "
                            f"{dm.PICKLE_REASON}; give --allow_bin to read them")
        for d in tqdm(modules, desc="peft -> ours", unit="adapter", disable=not a.progress, dynamic_ncols=True):
            config = peft_to_ours(d, dst / d.name / "checkpoint-best.safetensors", allow)
        print(f"wrote {len(modules)} source deltas to {dst}/{{name}}/checkpoint-best.safetensors "
              f"(last: {describe(config)})")
        return
    src = Path(a.to_peft)
    if not a.out:
        raise UserError("--to_peft needs --out (the peft folder to write)")
    if src.is_file() or dm.is_peft_folder(src):
        print(f"wrote {a.out}: {describe(ours_to_peft(src, Path(a.out), a.base_model, allow))}")
        return
    if not src.is_dir():
        raise UserError(f"--to_peft {src}: no such delta file or folder")
    found = deltas_to_export(src)
    bar = tqdm(found.items(), desc="ours -> peft", unit="delta", disable=not a.progress, dynamic_ncols=True)
    for task, path in bar:
        config = ours_to_peft(path, Path(a.out) / task, a.base_model, allow)
    print(f"wrote {len(found)} peft folders to {a.out}/{{task}}/ (last: {describe(config)})")


if __name__ == "__main__":
    sys.exit(main())
