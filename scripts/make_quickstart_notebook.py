"""Regenerates notebooks/quickstart.ipynb and executes it, so the committed file shows its outputs.

    python scripts/make_quickstart_notebook.py            # write + execute (about 2.5 min on 2 cores)
    python scripts/make_quickstart_notebook.py --no-run   # write the cells only

tests/test_notebook.py checks the committed outputs and executes the notebook again.
"""

import argparse
from pathlib import Path

import nbformat as nbf

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("""# elm quickstart

Search a tiny ELM space offline, look at what the search saw, retrain the chosen architecture into a Hugging Face model, and check whether the search's weights beat the same architecture from random init after the same fine-tuning. Everything runs on a laptop CPU in a few minutes through `elm.api`, whose functions take the same settings as the commands (`python -m elm.search ...`); real runs drop the tiny overrides."""),
    code("""import tempfile
import warnings
from pathlib import Path

from tqdm import TqdmWarning

warnings.simplefilter("ignore", TqdmWarning)     # no ipywidgets here: plain bars are fine

import matplotlib.pyplot as plt
from IPython.display import Image, display

import datasets
import transformers

import elm
import elm.api

datasets.disable_progress_bars()                 # a notebook wants results, not bars
transformers.utils.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()
work = Path(tempfile.mkdtemp(prefix="elm-quickstart-"))
print("elm", elm.__version__)"""),
    md("""## 1. Search a tiny space

`+experiment=smoke` pins a tiny space (2 layers, 64 wide), 60 BBC articles and 9 training steps; the teacher is the packaged all-MiniLM-L6-v2. The search returns one architecture per parameter budget. Parameters are counted one way throughout: embeddings + layers (`ArchConfig.num_parameters()`, the budgets' unit plus the embeddings)."""),
    code("""found = elm.api.search("+experiment=smoke", device="cpu", run_dir=work / "search")
for name, arch in found.archs.items():
    blocks = ", ".join(f"{l.block}({l.num_heads}h, ffn {l.ffn_dim}x{l.num_ffn}, share {l.share})" for l in arch.layers)
    print(f"{name}: {arch.num_parameters():,} parameters: {blocks}")"""),
    md("""## 2. What the search saw

PCA scores of the FFN activations (growth), head similarity by CKA (pruning), and the chosen architecture."""),
    code("""for name in ["pca_curves", "cka_heatmap", "architecture"]:
    display(Image(filename=str(found.plots[name])))"""),
    md("""## 3. Retrain: the searched student, and the same shape from scratch

The same distillation budget for both: `searched` starts from the supernet's weights, `scratch` from random init (passing an `ArchConfig` instead of the search means no search weights). Each export is a `save_pretrained` folder."""),
    code("""budget = dict(device="cpu", progress=False, data={"max_docs": 200, "seq_len": 64},
              retrain={"epochs": 1, "steps_per_epoch": 40, "batch_size": 8, "eval_batches": 4},
              teacher_head={"steps": 40})
students = {
    "searched": elm.api.retrain(found, run_dir=work / "retrain-searched", **budget),
    "scratch": elm.api.retrain(found.arch, run_dir=work / "retrain-scratch", **budget),
}
for name, s in students.items():
    print(f"{name}: {s.params:,} parameters, validation MLM loss {s.val_loss:.3f}")"""),
    md(
        """The export loads with the stock Auto classes (`import elm` registers the model type); its parameter count is the architecture's."""
    ),
    code("""from transformers import AutoModel

model = AutoModel.from_pretrained(students["searched"].model_dir)
print(type(model).__name__, f"{model.num_parameters():,} parameters", model.num_parameters() == found.arch.num_parameters())"""),
    md("""## 4. Fine-tune both on BBC topics and compare

Same rows, seeds and settings for both (`python -m elm.finetune` with a small budget: 800 articles, 10 epochs, five seeds); the score is accuracy on BBC's validation split (446 articles, 5 topics; 0.23 is the majority class)."""),
    code("""finetune = dict(device="cpu", seeds=[0, 1, 2, 3, 4], data={"max_train": 800, "max_length": 64},
                train={"epochs": 10, "lr": 3e-3})
scores = {name: elm.api.finetune(s, task="bbc", run_dir=work / f"finetune-{name}", **finetune)
          for name, s in students.items()}
for name, r in scores.items():
    per_seed = ", ".join(f"{p['metrics']['accuracy']:.3f}" for p in r.results["per_seed"])
    print(f"{name}: accuracy {r.mean['accuracy']:.3f} ± {r.std['accuracy']:.3f} (seeds: {per_seed})")

names = list(scores)
fig, ax = plt.subplots(figsize=(4, 3))
ax.bar(names, [scores[n].mean["accuracy"] for n in names], yerr=[scores[n].std["accuracy"] for n in names],
       capsize=6, color=["tab:blue", "tab:gray"])
ax.set_ylabel("BBC validation accuracy"); ax.set_ylim(0, 1)
ax.set_title(f"{found.arch.num_parameters():,}-parameter students")
plt.show()"""),
    code("""from scipy.stats import ttest_ind

acc = {n: [p["metrics"]["accuracy"] for p in scores[n].results["per_seed"]] for n in names}
gap = scores["searched"].mean["accuracy"] - scores["scratch"].mean["accuracy"]
p = ttest_ind(acc["searched"], acc["scratch"], equal_var=False).pvalue  # Welch's t-test over the seeds
if p < 0.05:
    print(f"searched - scratch = {gap:+.3f} accuracy (Welch p = {p:.3f}): the seeds separate the two models.")
else:
    print(f"searched - scratch = {gap:+.3f} accuracy (Welch p = {p:.3f}): at this size (9 search steps, "
          "40 retraining steps) five seeds cannot separate them.")"""),
    md(
        """At real size (`python -m elm.search`, then `python -m elm.compare search_dir=...` for equal-size baselines retrained and fine-tuned alike) the measured numbers are in `docs/evaluate.md`."""
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="write the cells without executing them")
    args = parser.parse_args()
    nb = nbf.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if not args.no_run:
        import tempfile

        import nbclient

        with tempfile.TemporaryDirectory() as cwd:
            nbclient.NotebookClient(
                nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": cwd}}
            ).execute()
        for cell in nb.cells:  # no timestamps or machine facts in the committed file
            cell.get("metadata", {}).pop("execution", None)
    nbf.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    main()
