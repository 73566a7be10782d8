"""The causal-LM path (docs/causal.md): GPT-style students searched, retrained and distilled from a
causal teacher, evaluated by perplexity, ROUGE-L and generation.

Entry points (Hydra; configs ``configs/causal_*.yaml``):

* ``python -m elm.causal.teacher_train`` — a small GPT-2-style teacher (:mod:`.teacher_train`);
* ``python -m elm.causal.minillm student=<dir> teacher.name=<dir>`` — MiniLLM / token-level KL
  (:mod:`.minillm`);
* ``python -m elm.causal.evaluate model=<dir>`` — perplexity, ROUGE-L, samples (:mod:`.evaluate`);
* ``python -m elm.causal.pipeline`` — teacher -> causal search -> retrain -> MiniLLM -> evaluate,
  searched vs uniform vs teacher (:mod:`.pipeline`).

Prompt/response data: :mod:`.prompts`. Submodules are imported on use (this package imports nothing
heavy by itself).
"""
