# Regenerates notebooks/quickstart.ipynb (run from the repo root): python scripts/make_quickstart_notebook.py
import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md(
        "# elm quickstart\n\nSearch a tiny ELM space offline, look at what the search saw, extract the chosen "
        "model as a Hugging Face model, fine-tune it briefly on the BBC topic task and compare it with a "
        "uniform baseline of the same size. Everything runs on a laptop CPU in a few minutes; the real runs "
        "use the same calls with the default (or paper-scale) configs."
    ),
    code(
        "import os, tempfile\n"
        "from pathlib import Path\n"
        "import torch\n"
        "from hydra import compose, initialize_config_dir\n"
        "from IPython.display import Image, display\n"
        "import elm\n"
        "from elm.utils.cli import CONFIG_DIR\n"
        "torch.set_num_threads(1)\n"
        "work = Path(tempfile.mkdtemp(prefix='elm-quickstart-'))"
    ),
    md(
        "## 1. Search a tiny space\n\nThe same Hydra config as `python -m elm.search`, composed in Python with "
        "tiny overrides (`configs/experiment/smoke.yaml` pins them)."
    ),
    code(
        "from elm.search.run import run_search\n"
        "with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base='1.3'):\n"
        "    cfg = compose('search', overrides=['+experiment=smoke', 'device=cpu'])\n"
        "summary = run_search(cfg, work / 'search')\n"
        "for name, point in summary['chosen'].items():\n"
        "    print(name, f\"{point['params']:,} params\", point['candidates'])"
    ),
    md(
        "## 2. What the search saw\n\nPCA score curves (FFN growth), head CKA of one layer, and the chosen architecture."
    ),
    code(
        "for png in ['pca_curves.png', 'cka_heatmap.png', 'architecture.png']:\n"
        "    display(Image(filename=str(work / 'search' / png)))"
    ),
    md(
        "## 3. The chosen architecture as a Hugging Face model\n\n`arch.json` is an `elm.ArchConfig`; "
        "`extract` copies the supernet's trained active path into a standalone model."
    ),
    code(
        "arch = elm.ArchConfig.from_json(work / 'search' / 'arch.json')\n"
        "print(arch.num_layers, 'layers,', f'{arch.num_parameters():,} params')\n"
        "from elm.retrain.init import init_from_search\n"
        "from elm.teacher import load_teacher\n"
        "teacher = load_teacher()\n"
        "model, _ = init_from_search(work / 'search', arch, teacher, elm.ElmForMaskedLM)\n"
        "print(type(model).__name__, sum(p.numel() for p in model.parameters()))"
    ),
    md("## 4. Fine-tune briefly and compare with a uniform baseline of the same size"),
    code(
        "from transformers import AutoModelForSequenceClassification\n"
        "from elm.compare.baselines import uniform_arch\n"
        "from elm.finetune.run import run_finetune\n"
        "baseline = uniform_arch(arch.num_parameters(), like=arch, head_dim=arch.layers[0].head_dim)\n"
        "print('uniform baseline:', f'{baseline.num_parameters():,} params', baseline.layers[0])\n"
        "dirs = {}\n"
        "for name, a, m in [('searched', arch, model), ('uniform', baseline, None)]:\n"
        "    m = m if m is not None else elm.ElmForMaskedLM(elm.config_from_arch(a))\n"
        "    dirs[name] = work / name\n"
        "    m.save_pretrained(dirs[name]); teacher.tokenizer.save_pretrained(dirs[name])\n"
        "with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base='1.3'):\n"
        "    ft = {n: compose('finetune', overrides=[f'model={d}', 'task=bbc', 'seeds=[0]', 'data.max_train=256',\n"
        "                                             'data.max_eval=64', 'train.epochs=2', 'device=cpu'])\n"
        "          for n, d in dirs.items()}\n"
        "results = {n: run_finetune(c, work / f'ft-{n}') for n, c in ft.items()}\n"
        "for n, r in results.items():\n"
        "    print(n, r['mean'])"
    ),
    md(
        "With a real budget (`python -m elm.compare search_dir=...`) every model gets the same retraining "
        "and several seeds; see `docs/evaluate.md`."
    ),
]
nb = nbf.v4.new_notebook(
    cells=cells,
    metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
)
nbf.write(nb, "notebooks/quickstart.ipynb")
