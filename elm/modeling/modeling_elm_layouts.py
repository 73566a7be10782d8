"""The layers of block families that bring their own layout (``BlockFamily.layout`` other than
``post_ln``), for ``modeling_elm.ElmLayer``: the one place where the exported model meets the registry.

This is the package's version: it asks ``elm.blocks``, whose family with layout ``<name>`` defines its
layer in ``elm/blocks/<name>_layer.py`` (a ``layer_parts(config, width, layer)`` that returns the
attention and the FFNs). An export cannot import ``elm``, and transformers ships only the files that
``modeling_elm.py`` imports by name, so ``save_pretrained`` calls :func:`write_export`: it copies each
layout the model uses beside the code as ``modeling_elm_<name>.py`` and writes over this file one
that imports them (:data:`EXPORTED`). Adding a family with its own layer so changes nothing here.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from elm.blocks import BLOCKS, ArchError

# what an export holds in place of this file: the layouts it ships and each of its families' layout
EXPORTED = '''"""The layers of this model's block families with their own layout (written by elm's export)."""
{imports}
LAYOUTS = {layouts}
FAMILIES = {families}  # block family -> layout, for a config that does not name them


def layer_parts(config, block: str):
    """The ``layer_parts`` of ``block``'s layout, or None for the post-LayerNorm layer."""
    name = (getattr(config, "block_layouts", None) or {{}}).get(block) or FAMILIES.get(block, "post_ln")
    return None if name == "post_ln" else LAYOUTS[name]


def write_export(directory, config) -> None:
    """Nothing to write: transformers copies this file and the layouts it imports."""
'''


def layout_of(config, block: str) -> str:
    """``block``'s layout: the one the config names (``block_layouts``), else, for a config written
    by hand, the registered family's (a family unknown to this process: post-LayerNorm, as exports
    name every other layout)."""
    return (getattr(config, "block_layouts", None) or {}).get(block) or getattr(BLOCKS.get(block), "layout", "post_ln")


def _module(name: str):
    try:
        return importlib.import_module(f"elm.blocks.{name}_layer")
    except ModuleNotFoundError as e:
        if e.name != f"elm.blocks.{name}_layer":
            raise
        raise ArchError(f"layout {name!r} is not one this elm has (no elm.blocks.{name}_layer); upgrade elm, or load "
                        "the export in a process without elm (trust_remote_code=True: it ships its layers)") from None  # fmt: skip


def layer_parts(config, block: str):
    """The ``layer_parts`` of ``block``'s layout (:func:`layout_of`), or None for the post-LayerNorm
    layer of ``modeling_elm``."""
    name = layout_of(config, block)
    return None if name == "post_ln" else _module(name).layer_parts


def write_export(directory, config) -> None:
    """Make the export in ``directory`` self-contained: its layouts' files and the file that imports them."""
    families = {layer["block"]: layout_of(config, layer["block"]) for layer in config.layers}
    families = {block: name for block, name in sorted(families.items()) if name != "post_ln"}
    names = sorted(set(families.values()))
    for name in names:
        shutil.copyfile(_module(name).__file__, Path(directory) / f"modeling_elm_{name}.py")
    imports = "".join(f"from .modeling_elm_{n} import layer_parts as {n}\n" for n in names)
    layouts = "{" + ", ".join(f'"{n}": {n}' for n in names) + "}"
    text = EXPORTED.format(imports=imports, layouts=layouts, families=repr(families).replace("'", '"'))
    (Path(directory) / Path(__file__).name).write_text(text)
